//! The program's last resorts and the table's other moves, on real sockets in a fresh
//! network namespace: when an entry's owner and heir are both closed it probes other entries'
//! owners; with no live slot at all it lets the kernel's own hash choose (either way every
//! flow is delivered: the program never refuses what a live socket could take); and a weight
//! change moves flows only to the slot whose weight grew.
use portshard::{group::Group, socket::Proto};
use portshard_common::Counters;
use portshard_harness::{
    flows::{self, Flows, Landing, Listener, loopback, lost, moved},
    scenario::{SERVICE_PORT, Sandbox, steer},
};

const LISTENERS: usize = 8;
const FLOWS: usize = 16_384;

fn setup(proto: Proto) -> (Sandbox, Flows, Vec<Option<Listener>>) {
    let sandbox = Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox: {e}"));
    let target = loopback(false, SERVICE_PORT);
    let listeners = flows::bind_listeners(proto, target, LISTENERS).unwrap();
    (sandbox, Flows::new(proto, target, FLOWS), listeners)
}

/// Sends every flow once; returns where each landed and what the program counted meanwhile.
fn counted_round(
    group: &Group,
    flows: &Flows,
    listeners: &[Option<Listener>],
) -> (Landing, Counters) {
    let before = group.dataplane().counters().unwrap();
    let landing = flows.round(listeners).unwrap();
    (
        landing,
        group.dataplane().counters().unwrap().since(&before),
    )
}

fn owner_and_heir_closed(proto: Proto) {
    let (sandbox, flows, mut listeners) = setup(proto);
    let group = steer(sandbox.pins(), "probe", &listeners).unwrap();
    let before = flows.round(&listeners).unwrap();
    // Close slot 0 and the slot that inherits most of slot 0's entries.
    let mut inherits = [0usize; LISTENERS];
    for entry in group.table().entries().iter().filter(|e| e.owner == 0) {
        inherits[usize::from(entry.heir)] += 1;
    }
    let heir = (1..LISTENERS).max_by_key(|&s| inherits[s]).unwrap();
    listeners[0] = None;
    listeners[heir] = None;
    let (after, delta) = counted_round(&group, &flows, &listeners);

    assert_eq!(
        lost(&after),
        0,
        "{proto}: flows lost with owner and heir closed"
    );
    let unaffected = (0..FLOWS).filter(|&f| before[f] != Some(0) && before[f] != Some(heir));
    assert!(
        unaffected.clone().all(|f| after[f] == before[f]),
        "{proto}: flows of live slots moved"
    );
    let probed: u64 = delta.slots.iter().map(|r| r.probed).sum();
    let failed_over: u64 = delta.slots.iter().map(|r| r.failed_over).sum();
    let selected: u64 = delta.slots.iter().map(|r| r.selected).sum();
    assert!(probed > 0, "{proto}: no flow needed the probe");
    assert_eq!(
        selected as usize,
        unaffected.count(),
        "{proto}: selected counter"
    );
    assert_eq!(
        (selected + failed_over + probed + delta.fell_through) as usize,
        FLOWS,
        "{proto}: every run counted once"
    );
    eprintln!(
        "{proto}: slots 0 and {heir} closed: {failed_over} failed over, {probed} probed, {} fell through, 0 lost",
        delta.fell_through
    );
}

fn empty_table_falls_through(proto: Proto) {
    let (sandbox, flows, listeners) = setup(proto);
    let mut group = steer(sandbox.pins(), "fallthrough", &listeners).unwrap();
    // Every slot leaves the table while its socket stays open in the group.
    for slot in 0..LISTENERS {
        group.remove(slot as u16).unwrap();
    }
    let (landing, delta) = counted_round(&group, &flows, &listeners);
    assert_eq!(
        lost(&landing),
        0,
        "{proto}: the kernel's fallback must deliver every flow"
    );
    assert_eq!(
        delta.fell_through as usize, FLOWS,
        "{proto}: fell_through counter"
    );
}

fn reweighting_moves_only_toward_the_heavier_slot(proto: Proto) {
    let (sandbox, flows, listeners) = setup(proto);
    let mut group = steer(sandbox.pins(), "weights", &listeners).unwrap();
    let before = flows.round(&listeners).unwrap();
    let delta = group.set_weights(&[(5, 3)].into()).unwrap();
    let after = flows.round(&listeners).unwrap();
    assert_eq!(lost(&after), 0, "{proto}: flows lost on reweighting");
    let elsewhere = (0..FLOWS)
        .filter(|&f| after[f] != before[f] && after[f] != Some(5))
        .count();
    assert_eq!(
        elsewhere, 0,
        "{proto}: flows moved between slots whose weight did not change"
    );
    // Slot 5 goes from 1/8 to 3/10 of the table: it takes 0.175 of it, and that share of flows.
    let table_share = f64::from(delta.moved) / portshard_common::TABLE_SIZE as f64;
    let flow_share = moved(&before, &after) as f64 / FLOWS as f64;
    assert!(
        (table_share - 0.175).abs() < 1e-4,
        "{proto}: table moved {table_share}"
    );
    assert!(
        (flow_share - table_share).abs() < 0.015,
        "{proto}: flows moved {flow_share}, table {table_share}"
    );
    let meta = group.dataplane().meta(5).unwrap();
    assert_eq!(meta.weight, 3, "{proto}: the slot record keeps the weight");
}

/// A UDP and a TCP test for each check.
macro_rules! per_protocol {
    ($($udp:ident, $tcp:ident => $check:ident;)*) => {
        $(
            #[test]
            fn $udp() {
                $check(Proto::Udp);
            }

            #[test]
            fn $tcp() {
                $check(Proto::Tcp);
            }
        )*
    };
}

per_protocol! {
    udp_owner_and_heir_closed_are_probed, tcp_owner_and_heir_closed_are_probed => owner_and_heir_closed;
    udp_empty_table_falls_through_to_the_kernel, tcp_empty_table_falls_through_to_the_kernel => empty_table_falls_through;
    udp_reweighting_moves_only_toward_the_heavier_slot, tcp_reweighting_moves_only_toward_the_heavier_slot => reweighting_moves_only_toward_the_heavier_slot;
}
