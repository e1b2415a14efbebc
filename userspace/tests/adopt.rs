//! A restarted daemon adopts what a killed one left half done, against the real kernel in
//! a fresh network namespace: a slot seated (socket placed, record written) whose table
//! commit never happened owns nothing; adoption gives it its share with the fewest moves.
use std::{collections::BTreeMap, path::Path, time::Duration};

mod support;

use portshard::{dataplane::Dataplane, table::Table};
use portshard_common::TABLE_SIZE;
use portshard_harness::daemon::DaemonRun;
use support::{EXE, READY, config, sandbox};

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
