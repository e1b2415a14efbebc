//! The pinned state: reused only when it is exactly what this build expects, refused with a
//! message naming the pin otherwise, readable by a later process, and removable.
use std::os::fd::AsFd as _;

use aya::maps::{Array, MapData};
use portshard::{
    bpffs,
    dataplane::{Dataplane, DataplaneError},
    group::{Group, GroupError, Holder},
    socket::{Proto, bind_reuseport},
};
use portshard_common::{SlotMeta, SlotState, Table, TableEntry, names};
use portshard_harness::{
    flows::loopback,
    scenario::{SERVICE_PORT, Sandbox},
};

fn enter() -> Sandbox {
    Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox: {e}"))
}

#[test]
fn state_survives_the_process_that_made_it() {
    let sandbox = enter();
    let socket = bind_reuseport(Proto::Udp, loopback(false, SERVICE_PORT)).unwrap();
    let entries = {
        let mut group = Group::create(sandbox.pins(), "keep", 0).unwrap();
        let holder = Holder {
            pid: 4242,
            generation: 7,
            started: 99,
            restarts: 1,
        };
        group.add(3, socket.as_fd(), 2, holder).unwrap();
        group.table().entries().to_vec()
    };
    let reopened = Dataplane::open(sandbox.pins(), "keep").unwrap();
    assert_eq!(
        reopened.read_entries(),
        entries,
        "the kernel's table as written"
    );
    let meta = reopened.meta(3).unwrap();
    assert_eq!(
        (meta.state, meta.weight, meta.pid, meta.generation),
        (SlotState::Live as u32, 2, 4242, 7)
    );
    assert_eq!(
        meta.cookie,
        portshard::socket::cookie(socket.as_fd()).unwrap()
    );

    // Creating again over compatible pins keeps the maps, and so the table.
    drop(reopened);
    let again = Dataplane::create(sandbox.pins(), "keep", 0).unwrap();
    assert_eq!(again.read_entries(), entries);
}

#[test]
fn a_pin_with_another_layout_is_refused_by_path() {
    let sandbox = enter();
    let dir = sandbox.pins().join("stale");
    bpffs::ensure_dir(&dir).unwrap();
    let stale_table = dir.join(names::TABLE);
    Array::<MapData, u64>::create(1, 0)
        .unwrap()
        .pin(&stale_table)
        .unwrap();

    let error = Dataplane::create(sandbox.pins(), "stale", 0)
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
        message.contains(&format!(
            "has value size 8, but this build expects {}",
            size_of::<Table>()
        )),
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
    let sandbox = enter();
    let dir = sandbox.pins().join("small");
    bpffs::ensure_dir(&dir).unwrap();
    // Right type, wrong number of entries.
    Array::<MapData, portshard_common::SlotMeta>::create(8, 0)
        .unwrap()
        .pin(dir.join(names::SLOTS))
        .unwrap();
    let message = Dataplane::create(sandbox.pins(), "small", 0)
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
    let sandbox = enter();
    drop(Dataplane::create(sandbox.pins(), "gone", 0).unwrap());
    Dataplane::remove_pins(sandbox.pins(), "gone").unwrap();
    assert!(!sandbox.pins().join("gone").exists());
    let message = Dataplane::open(sandbox.pins(), "gone")
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with(&format!(
            "no dataplane is pinned at {}",
            sandbox.pins().join("gone").display()
        )),
        "{message}"
    );
}

#[test]
fn a_root_outside_bpffs_is_refused() {
    let _sandbox = enter();
    let dir = std::env::temp_dir().join(format!("portshard-not-bpffs-{}", std::process::id()));
    let message = Dataplane::create(&dir, "x", 0).err().unwrap().to_string();
    assert!(message.contains("is not on a BPF filesystem"), "{message}");
    assert!(!dir.exists(), "nothing created outside bpffs");
}

#[test]
fn bad_service_names_are_refused() {
    let sandbox = enter();
    let message = Dataplane::create(sandbox.pins(), "../escape", 0)
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
    let sandbox = enter();
    let dir = sandbox.pins().join("wrong");
    bpffs::ensure_dir(&dir).unwrap();
    // An ordinary array where the socket array belongs.
    Array::<MapData, u32>::create(512, 0)
        .unwrap()
        .pin(dir.join(names::SOCKETS))
        .unwrap();
    let message = Dataplane::create(sandbox.pins(), "wrong", 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("has map type Array, but this build expects ReuseportSockArray"),
        "{message}"
    );
}

#[test]
fn a_group_is_not_created_over_a_live_one() {
    let sandbox = enter();
    let socket = bind_reuseport(Proto::Udp, loopback(false, SERVICE_PORT)).unwrap();
    let mut group = Group::create(sandbox.pins(), "busy", 0).unwrap();
    group
        .add(1, socket.as_fd(), 1, Holder::this_process())
        .unwrap();
    let written = group.dataplane().read_entries();

    let error = Group::create(sandbox.pins(), "busy", 0)
        .err()
        .expect("a live group must be refused");
    assert!(
        matches!(error, GroupError::InUse { slot: 1, .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("slot 1 is recorded live"), "{message}");
    assert_eq!(
        group.dataplane().read_entries(),
        written,
        "the live table is untouched"
    );

    // Once its slots are dead, a new group starts clean: no records, an empty table.
    group.remove(1).unwrap();
    drop(group);
    let fresh = Group::create(sandbox.pins(), "busy", 0).unwrap();
    assert_eq!(fresh.dataplane().meta(1).unwrap(), SlotMeta::FREE);
    assert!(
        fresh
            .dataplane()
            .read_entries()
            .iter()
            .all(|e| *e == TableEntry::EMPTY)
    );
}
