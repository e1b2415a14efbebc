//! The pinned state: reused only when it is exactly what this build expects, refused with a
//! message naming the pin otherwise, readable by a later process, and removable.
use std::os::fd::AsFd as _;

use aya::maps::{Array, MapData};
use portshard::{
    bpffs,
    dataplane::{Dataplane, DataplaneError},
    group::Group,
    socket::{Proto, bind_reuseport},
};
use portshard_common::{SlotState, names};
use portshard_harness::{
    flows::loopback,
    netns::NetNs,
    scenario::{PinRoot, SERVICE_PORT},
};

fn enter() -> (NetNs, PinRoot) {
    let netns = NetNs::enter().expect("kernel tests need root to create a network namespace");
    (
        netns,
        PinRoot::new().expect("creating a pin root on the BPF filesystem"),
    )
}

#[test]
fn state_survives_the_process_that_made_it() {
    let (_netns, pins) = enter();
    let socket = bind_reuseport(Proto::Udp, loopback(false, SERVICE_PORT)).unwrap();
    let entries = {
        let mut group = Group::create(pins.path(), "keep").unwrap();
        group.add(3, socket.as_fd(), 2).unwrap();
        group.table().entries().to_vec()
    };
    let reopened = Dataplane::open(pins.path(), "keep").unwrap();
    assert_eq!(
        reopened.read_entries(),
        entries,
        "the kernel's table as written"
    );
    let meta = reopened.meta(3).unwrap();
    assert_eq!(
        (meta.state, meta.weight, meta.pid),
        (SlotState::Live as u32, 2, std::process::id())
    );
    assert_eq!(
        meta.cookie,
        portshard::socket::cookie(socket.as_fd()).unwrap()
    );

    // Creating again over compatible pins keeps the maps, and so the table.
    drop(reopened);
    let again = Dataplane::create(pins.path(), "keep").unwrap();
    assert_eq!(again.read_entries(), entries);
}

#[test]
fn a_pin_with_another_layout_is_refused_by_path() {
    let (_netns, pins) = enter();
    let dir = pins.path().join("stale");
    bpffs::ensure_dir(&dir).unwrap();
    let stale_table = dir.join(names::TABLE);
    Array::<MapData, u64>::create(1, 0)
        .unwrap()
        .pin(&stale_table)
        .unwrap();

    let error = Dataplane::create(pins.path(), "stale")
        .err()
        .expect("a stale pin must be refused");
    let message = error.to_string();
    assert!(
        matches!(error, DataplaneError::PinMismatch { .. }),
        "{message}"
    );
    assert!(
        message.contains(&stale_table.display().to_string()),
        "names the pin: {message}"
    );
    assert!(
        message.contains("has value size 8, but this build expects 262144"),
        "names what differs: {message}"
    );
    assert!(
        message.contains(&format!("remove {}", dir.display())),
        "says what to do: {message}"
    );
    // Nothing was loaded or pinned beside the stale map, and it was not touched.
    let pinned: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(pinned, [names::TABLE]);
    assert_eq!(
        aya::maps::MapInfo::from_pin(&stale_table)
            .unwrap()
            .value_size(),
        8
    );
}

#[test]
fn a_pin_with_another_size_is_refused() {
    let (_netns, pins) = enter();
    let dir = pins.path().join("small");
    bpffs::ensure_dir(&dir).unwrap();
    // Right type, wrong number of entries.
    Array::<MapData, portshard_common::SlotMeta>::create(8, 0)
        .unwrap()
        .pin(dir.join(names::SLOTS))
        .unwrap();
    let message = Dataplane::create(pins.path(), "small")
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("has max entries 8, but this build expects 512"),
        "{message}"
    );
}

#[test]
fn removing_pins_leaves_nothing() {
    let (_netns, pins) = enter();
    drop(Dataplane::create(pins.path(), "gone").unwrap());
    Dataplane::remove_pins(pins.path(), "gone").unwrap();
    assert!(!pins.path().join("gone").exists());
    let message = Dataplane::open(pins.path(), "gone")
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with(&format!(
            "no dataplane is pinned at {}",
            pins.path().join("gone").display()
        )),
        "{message}"
    );
}

#[test]
fn a_root_outside_bpffs_is_refused() {
    let (_netns, _pins) = enter();
    let dir = std::env::temp_dir().join(format!("portshard-not-bpffs-{}", std::process::id()));
    let message = Dataplane::create(&dir, "x").err().unwrap().to_string();
    assert!(message.contains("is not on a BPF filesystem"), "{message}");
    assert!(!dir.exists(), "nothing created outside bpffs");
}

#[test]
fn bad_service_names_are_refused() {
    let (_netns, pins) = enter();
    let message = Dataplane::create(pins.path(), "../escape")
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("service name \"../escape\" is invalid"),
        "{message}"
    );
}

#[test]
fn a_pin_of_another_type_is_refused() {
    let (_netns, pins) = enter();
    let dir = pins.path().join("wrong");
    bpffs::ensure_dir(&dir).unwrap();
    // An ordinary array where the socket array belongs.
    Array::<MapData, u32>::create(512, 0)
        .unwrap()
        .pin(dir.join(names::SOCKETS))
        .unwrap();
    let message = Dataplane::create(pins.path(), "wrong")
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("has map type Array, but this build expects ReuseportSockArray"),
        "{message}"
    );
}
