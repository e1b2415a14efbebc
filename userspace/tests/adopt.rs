//! A restarted daemon adopts what a killed one left behind, against the real kernel in a
//! fresh network namespace: a slot seated (socket placed, record written) whose table
//! commit never happened owns nothing, and adoption gives it its share with the fewest
//! moves; pins of layout 2 (the flow table keyed by hash alone) are migrated to this
//! build's layout and the group then steers through the new maps.
use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
    time::Duration,
};

mod support;

use aya::maps::{Array, MapData};
use portshard::{dataplane::Dataplane, table::Table};
use portshard_common::{TABLE_SIZE, names};
use portshard_harness::daemon::{DaemonRun, UdpFlows};
use support::{EXE, READY, config, sandbox, target};

#[test]
fn a_daemon_killed_between_seat_and_commit_is_adopted_with_every_member_owning_its_share() {
    const WORKERS: u16 = 4;
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(
        Path::new(EXE),
        &config(&[("dns", "udp", usize::from(WORKERS))]),
        sandbox.pins(),
    )
    .unwrap();
    daemon
        .wait_ready(&[("dns", usize::from(WORKERS))], READY)
        .unwrap();
    daemon.kill9().unwrap();

    // The pins as a daemon killed after seating slot 3 but before committing its table
    // leaves them: slot 3 is live with its socket in place, the table the one before it.
    let dataplane = Dataplane::open(sandbox.pins(), "dns").unwrap();
    let before = Table::with_members((0..WORKERS - 1).map(|slot| (slot, 1))).unwrap();
    dataplane.write_all(before.entries()).unwrap();
    let owned = |entries: &[portshard_common::TableEntry]| {
        let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
        for entry in entries {
            *counts.entry(entry.owner).or_default() += 1;
        }
        counts
    };
    assert!(!owned(before.entries()).contains_key(&(WORKERS - 1)));

    daemon.spawn().unwrap();
    daemon
        .wait_ready(&[("dns", usize::from(WORKERS))], READY)
        .unwrap();
    let deadline = std::time::Instant::now() + READY;
    let after = loop {
        let after = dataplane.read_entries();
        if owned(&after).len() == usize::from(WORKERS) {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot 3 never got a share"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let counts = owned(&after);
    let moved = before
        .entries()
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.owner != a.owner)
        .count();
    let share = TABLE_SIZE / usize::from(WORKERS);
    eprintln!("seat without commit: adopted with entries per slot {counts:?}, {moved} moved");
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![share; usize::from(WORKERS)]
    );
    // Only what the newcomer takes moves.
    assert_eq!(moved, share);
    assert!(
        before
            .entries()
            .iter()
            .zip(&after)
            .filter(|(b, a)| b.owner != a.owner)
            .all(|(_, a)| a.owner == WORKERS - 1)
    );
}

/// `bpf(2)` with command `command` on `attr` (a prefix of `union bpf_attr`).
fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid prefix of `bpf_attr` of the size passed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<T>() as u32,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Creates and pins at `path` the flow table of pin layouts 1 and 2: an LRU hash from the
/// flow hash (`u32`) to a 16-byte flow, of `capacity` flows.
fn pin_legacy_flow_table(path: &Path, capacity: u32) -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    // map_type, key_size, value_size, max_entries, map_flags
    let mut create = [BPF_MAP_TYPE_LRU_HASH, 4, 16, capacity, 0];
    let fd = bpf(BPF_MAP_CREATE, &mut create)? as i32;
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let pathname = CString::new(path.as_os_str().as_bytes()).expect("no NUL in a pin path");
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut pin = Pin {
        pathname: pathname.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin).map(drop)
}

#[test]
fn pins_of_layout_2_are_migrated_and_the_group_steers_through_the_new_flow_table() {
    const FLOWS: usize = 512;
    let sandbox = sandbox();
    let config = config(&[("dns", "udp", 2)]).replace("[[service]]", "[[service]]\nsticky = true");
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    daemon.kill9().unwrap();

    // Layout 2 as an older build left it: the flow table keyed by hash alone, none of the
    // maps layouts 3 and 4 added, and the layout map saying 2. (The pinned program is
    // this build's; an older build's would differ only in its tag.)
    let dir = sandbox.pins().join("dns");
    for name in names::ADDED_IN_LAYOUT_3
        .iter()
        .chain(&names::ADDED_IN_LAYOUT_4)
    {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    pin_legacy_flow_table(&dir.join(names::LEGACY_FLOWS), 65_536).unwrap();
    let layout = MapData::from_pin(dir.join(names::LAYOUT)).unwrap();
    let mut layout: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(layout)).unwrap();
    layout.set(0, 2, 0).unwrap();

    daemon.spawn().unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    let status = daemon.status().unwrap();
    let dns = status.iter().find(|s| s.name == "dns").unwrap();
    assert_eq!(dns.pin_layout, portshard_common::PIN_LAYOUT);
    assert!(
        !dir.join(names::LEGACY_FLOWS).exists(),
        "the old flow table is still pinned"
    );
    // Flows are admitted to the new flow table: the group's program uses the new maps.
    let mut flows = UdpFlows::new(target(), FLOWS).unwrap();
    let first = flows.settle(READY).unwrap();
    let second = flows.round(Duration::from_secs(2)).unwrap();
    let same = first
        .iter()
        .zip(&second)
        .filter(|(a, b)| Some(**a) == **b)
        .count();
    let table = Dataplane::open(sandbox.pins(), "dns")
        .unwrap()
        .status()
        .unwrap();
    let table = table.flow_table.unwrap();
    eprintln!(
        "layout 2 migrated: {same} of {FLOWS} flows answered twice by one worker; flow table {table:?}"
    );
    assert_eq!(same, FLOWS);
    assert_eq!((table.flows, table.new), (FLOWS as u64, FLOWS as u64));
    assert!(
        daemon.log_text().contains("migrated"),
        "{}",
        daemon.log_text()
    );
}
