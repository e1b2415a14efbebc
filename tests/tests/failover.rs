//! The program's last resorts, on real sockets in a fresh network namespace: when an entry's
//! owner and heir are both closed it probes other entries' owners, and with no live slot at
//! all it lets the kernel's own hash choose. Either way every flow is delivered: the program
//! never refuses what a live socket could take.
use std::os::fd::AsFd as _;

use portshard::{group::Group, socket::Proto, table::Slot};
use portshard_harness::{
    flows::{Flows, Listener, loopback, lost},
    netns::{NetNs, raise_fd_limit},
    scenario::{PinRoot, SERVICE_PORT, counter_delta},
};

const LISTENERS: usize = 8;
const FLOWS: usize = 16_384;

struct Setup {
    _netns: NetNs,
    pins: PinRoot,
    flows: Flows,
    listeners: Vec<Option<Listener>>,
}

fn setup(proto: Proto) -> Setup {
    let netns = NetNs::enter().expect("kernel tests need root to create a network namespace");
    raise_fd_limit().expect("raising the open-file limit");
    let pins = PinRoot::new().expect("creating a pin root on the BPF filesystem");
    let target = loopback(false, SERVICE_PORT);
    let listeners = (0..LISTENERS)
        .map(|_| Listener::bind(proto, target).map(Some))
        .collect::<Result<_, _>>()
        .unwrap();
    Setup {
        _netns: netns,
        pins,
        flows: Flows::new(proto, target, FLOWS),
        listeners,
    }
}

fn owner_and_heir_closed(proto: Proto) {
    let Setup {
        _netns,
        pins,
        flows,
        mut listeners,
    } = setup(proto);
    let mut group = Group::create(pins.path(), "probe").unwrap();
    for (slot, listener) in listeners.iter().enumerate() {
        group
            .add(slot as Slot, listener.as_ref().unwrap().as_fd(), 1)
            .unwrap();
    }
    let before = flows.round(&listeners).unwrap();
    // Close slot 0 and the slot that inherits most of slot 0's entries.
    let entries = group.table().entries();
    let mut inherits = [0usize; LISTENERS];
    entries
        .iter()
        .filter(|e| e.owner == 0)
        .for_each(|e| inherits[usize::from(e.heir)] += 1);
    let heir = (1..LISTENERS).max_by_key(|&s| inherits[s]).unwrap();
    let counters_before = group.dataplane().counters().unwrap();
    listeners[0] = None;
    listeners[heir] = None;
    let after = flows.round(&listeners).unwrap();
    let delta = counter_delta(&counters_before, &group.dataplane().counters().unwrap());

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
    let Setup {
        _netns,
        pins,
        flows,
        listeners,
    } = setup(proto);
    let mut group = Group::create(pins.path(), "fallthrough").unwrap();
    for (slot, listener) in listeners.iter().enumerate() {
        group
            .add(slot as Slot, listener.as_ref().unwrap().as_fd(), 1)
            .unwrap();
    }
    // Every slot leaves the table while its socket stays open in the group.
    for slot in 0..LISTENERS {
        group.remove(slot as Slot).unwrap();
    }
    let counters_before = group.dataplane().counters().unwrap();
    let landing = flows.round(&listeners).unwrap();
    let delta = counter_delta(&counters_before, &group.dataplane().counters().unwrap());
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

#[test]
fn udp_owner_and_heir_closed_are_probed() {
    owner_and_heir_closed(Proto::Udp);
}

#[test]
fn tcp_owner_and_heir_closed_are_probed() {
    owner_and_heir_closed(Proto::Tcp);
}

#[test]
fn udp_empty_table_falls_through_to_the_kernel() {
    empty_table_falls_through(Proto::Udp);
}

#[test]
fn tcp_empty_table_falls_through_to_the_kernel() {
    empty_table_falls_through(Proto::Tcp);
}
