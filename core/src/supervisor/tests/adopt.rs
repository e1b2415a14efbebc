//! Adoption after a daemon restart, and SIGHUP diffs.
use std::collections::BTreeMap;

use super::*;
use crate::table::Table;

/// The switches of a UDP service in balance mode with the default `flow_idle`.
const UDP_BALANCE: Switches = Switches {
    flags: 0,
    flow_idle_s: 120,
};

/// A slot record as a previous daemon left it, with restarts 2 and pid 500 + slot.
fn record(slot: Slot, state: SlotState, generation: u32, alive: bool) -> AdoptedSlot {
    AdoptedSlot {
        slot,
        state,
        pid: 500 + u32::from(slot),
        generation,
        restarts: 2,
        alive,
    }
}

/// Makes the table part of `ops` on `table`, as the daemon's group does; returns the
/// entries moved.
fn replay(table: &mut Table, ops: &[TableOp]) -> u32 {
    ops.iter()
        .map(|op| match op {
            TableOp::Remove(slot) | TableOp::Drain(slot) => table.remove(*slot).unwrap().moved,
            TableOp::Release(slot) if table.members().contains_key(slot) => {
                table.remove(*slot).unwrap().moved
            }
            TableOp::Admit { slot, weight } => table.add(*slot, *weight).unwrap().moved,
            TableOp::SetWeights(weights) => table.set_weights(weights).unwrap().moved,
            TableOp::Settle => table.settle().moved,
            TableOp::Switch { old, new, weight } => table.switch(old, new, *weight).unwrap().moved,
            TableOp::Release(_) | TableOp::SetSwitches(_) | TableOp::SetHealth { .. } => 0,
        })
        .sum()
}

#[test]
fn adoption_keeps_live_workers_restarts_dead_ones_and_rolls_back_a_half_done_reload() {
    let adoption = Adoption {
        generation: 3,
        members: [(0, 1), (1, 1), (2, 1), (4, 1)].into(),
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
            TableOp::Drain(4),
            TableOp::Release(5),
            TableOp::Release(6),
            TableOp::Release(7),
            TableOp::Settle,
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
    let actions = h.feed(hangup(both));
    assert_eq!(
        table_ops(&actions),
        vec![
            TableOp::SetWeights([(0, 2), (1, 2)].into()),
            TableOp::SetSwitches(UDP_BALANCE),
        ]
    );
    assert_eq!(spawns(&actions), vec![(2, false, 1)]);
    assert!(matches!(&actions.last(), Some(Action::AddService { spec, .. }) if spec.name == "web"));
    // Fewer workers: the highest current slot retires.
    let actions = h.feed(hangup(vec![service("workers = 2\nweight = 2")]));
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::SetSwitches(UDP_BALANCE), TableOp::Drain(2)]
    );
    assert_eq!(h.sup.retiring(), vec![(0, 2, h.pid(2))]);
    // The same config again changes nothing.
    assert!(
        h.feed(hangup(vec![service("workers = 2\nweight = 2")]))
            .is_empty()
    );
    // A new command takes a new generation.
    let actions = h.feed(hangup(vec![service(
        "workers = 2\nweight = 2\ncommand = [\"srv2\"]",
    )]));
    assert_eq!(spawns(&actions), vec![(3, true, 2), (4, true, 2)]);
    // A change of what the pins record is refused: nothing happens.
    let actions = h.feed(hangup(vec![service("workers = 2\nproto = \"tcp\"")]));
    assert!(actions.is_empty());
}

#[test]
fn adoption_gives_a_live_member_that_owns_nothing_its_share_from_the_others_surplus() {
    // The previous daemon seated slot 3 (recorded live, its worker runs) and slot 4 (its
    // worker died since) and was killed before writing their entries: the pinned table is
    // over slots 0 to 2, and the pins make all five members, as the daemon reads them.
    let pinned = Table::with_members([(0, 1), (1, 1), (2, 1)]).unwrap();
    let members: BTreeMap<Slot, u32> = (0..5).map(|slot| (slot, 1)).collect();
    let mut table = Table::adopt(pinned.entries().to_vec(), members.clone()).unwrap();
    let adopted = table.counts();
    assert_eq!((adopted[&3], adopted[&4]), (0, 0));
    let adoption = Adoption {
        generation: 1,
        members,
        slots: (0..5)
            .map(|slot| record(slot, SlotState::Live, 1, slot != 4))
            .collect(),
    };
    let mut sup = Supervisor::<()>::new();
    sup.handle(
        Instant::now(),
        Event::Added {
            spec: Box::new(service("workers = 5")),
            launch: (),
            adoption,
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    let ops = table_ops(&actions);
    // The dead slot leaves first, then one rebalance over the live members.
    assert_eq!(ops, vec![TableOp::Remove(4), TableOp::Settle]);
    let before = table.clone();
    let moved = replay(&mut table, &ops);
    // Slot 3 takes its quarter, 16384 of 65536 entries, and nothing else moves: slots 0 to
    // 2 each give only what they held above a quarter.
    assert_eq!(moved, 16_384);
    assert_eq!(table.counts(), (0..4).map(|slot| (slot, 16_384)).collect());
    for (was, is) in before.entries().iter().zip(table.entries()) {
        if was.owner != is.owner {
            assert_eq!(
                is.owner, 3,
                "an entry moved between members that had their share"
            );
        }
    }
    assert!(table.is_exactly_balanced());
    table.validate().unwrap();
    // Adopting the settled table again moves nothing.
    let mut again = Supervisor::<()>::new();
    again.handle(
        Instant::now(),
        Event::Added {
            spec: Box::new(service("workers = 4")),
            launch: (),
            adoption: Adoption {
                generation: 1,
                members: table.members().clone(),
                slots: (0..4)
                    .map(|slot| record(slot, SlotState::Live, 1, true))
                    .collect(),
            },
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| again.poll_action()).collect();
    assert_eq!(replay(&mut table, &table_ops(&actions)), 0);
}

#[test]
fn adoption_settles_shares_after_retiring_extra_workers_so_nothing_moves_twice() {
    // As above, but the config now asks for 3 workers: the entryless slot 3 retires rather
    // than take a share it would hand on at once.
    let pinned = Table::with_members([(0, 1), (1, 1), (2, 1)]).unwrap();
    let members: BTreeMap<Slot, u32> = (0..4).map(|slot| (slot, 1)).collect();
    let mut table = Table::adopt(pinned.entries().to_vec(), members.clone()).unwrap();
    let mut sup = Supervisor::<()>::new();
    sup.handle(
        Instant::now(),
        Event::Added {
            spec: Box::new(service("workers = 3")),
            launch: (),
            adoption: Adoption {
                generation: 1,
                members,
                slots: (0..4)
                    .map(|slot| record(slot, SlotState::Live, 1, true))
                    .collect(),
            },
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    let ops = table_ops(&actions);
    assert_eq!(ops, vec![TableOp::Drain(3), TableOp::Settle]);
    assert_eq!(replay(&mut table, &ops), 0);
    assert_eq!(table.entries(), pinned.entries());
}

#[test]
fn hangup_doubling_every_weight_is_one_rebalance_that_moves_nothing() {
    let mut h = Harness::with(service("workers = 4"));
    let mut table = Table::with_members(h.sup.services[0].members.clone()).unwrap();
    let before = table.clone();
    let actions = h.feed(hangup(vec![service("workers = 4\nweight = 2")]));
    let ops = table_ops(&actions);
    assert_eq!(
        ops,
        vec![
            TableOp::SetWeights((0..4).map(|slot| (slot, 2)).collect()),
            TableOp::SetSwitches(UDP_BALANCE),
        ]
    );
    assert_eq!(replay(&mut table, &ops), 0);
    assert_eq!(table.entries(), before.entries());
    // Its outcome is only logged, whichever it is.
    let ticket = first_ticket(&actions);
    assert!(
        h.feed(Event::TableDone {
            ticket,
            result: Ok(0)
        })
        .is_empty()
    );
    let actions = h.feed(hangup(vec![service("workers = 4\nweight = 3")]));
    let ticket = first_ticket(&actions);
    let refused = Event::TableDone {
        ticket,
        result: Err("refused".to_owned()),
    };
    assert!(h.feed(refused).is_empty());
}

/// SIGHUP with `services` as the file now says, each with its launch.
fn hangup(services: Vec<Service>) -> Event<()> {
    Event::Hangup {
        named: services.iter().map(|s| s.name.clone()).collect(),
        services: services.into_iter().map(|s| (s, ())).collect(),
    }
}
