//! A TCP listener closes while connections wait in its accept queue: with plain
//! `SO_REUSEPORT` they are reset; with portshard's migrate program each one moves to the
//! listener its table entry names as heir, and all are served. Each case in a fresh network
//! namespace.
use portshard_harness::scenario::{QueuedOnClose, Sandbox};

fn queued_on_close(ipv6: bool, listeners: usize) {
    let sandbox = Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox: {e}"));
    let case = QueuedOnClose {
        ipv6,
        listeners,
        victim: listeners / 2,
        connections: 128 * listeners,
    };
    let label = format!(
        "{} N={listeners} connections={}",
        if ipv6 { "ipv6" } else { "ipv4" },
        case.connections
    );

    let kernel = case
        .kernel()
        .unwrap_or_else(|e| panic!("{label}: kernel run: {e:#}"));
    assert!(
        kernel.queued_at_victim > 0,
        "{label}: nothing queued at the closing listener"
    );
    assert_eq!(
        kernel.reset, kernel.queued_at_victim,
        "{label}: plain SO_REUSEPORT should reset exactly the closed listener's queue"
    );

    let ours = case
        .portshard(sandbox.pins())
        .unwrap_or_else(|e| panic!("{label}: portshard run: {e:#}"));
    let outcome = &ours.outcome;
    assert!(
        outcome.queued_at_victim > 0,
        "{label}: nothing queued at the closing listener"
    );
    assert_eq!(
        outcome.reset, 0,
        "{label}: portshard let {} queued connections be reset",
        outcome.reset
    );
    assert_eq!(
        outcome.served, case.connections,
        "{label}: not every connection was served"
    );

    let mut migrated_expected = vec![0u64; listeners];
    for flow in 0..case.connections {
        let expected = if ours.owners[flow] == Some(case.victim) {
            ours.heirs[flow]
        } else {
            ours.owners[flow]
        };
        assert_eq!(
            outcome.accepted_by[flow], expected,
            "{label}: connection {flow} accepted by the wrong listener"
        );
        if ours.owners[flow] == Some(case.victim) {
            migrated_expected[expected.expect("heir is a listener")] += 1;
        }
    }
    assert_eq!(
        migrated_expected.iter().sum::<u64>() as usize,
        outcome.queued_at_victim,
        "{label}: queue size vs owned flows"
    );
    assert_eq!(
        ours.migrated, migrated_expected,
        "{label}: migrated counters per slot"
    );
    eprintln!(
        "{label}: queued at the closing listener: kernel {} reset of {}, portshard {} migrated to heirs, {} reset",
        kernel.reset, kernel.queued_at_victim, outcome.queued_at_victim, outcome.reset
    );
}

#[test]
fn ipv4_two_listeners() {
    queued_on_close(false, 2);
}

#[test]
fn ipv4_eight_listeners() {
    queued_on_close(false, 8);
}

#[test]
fn ipv6_two_listeners() {
    queued_on_close(true, 2);
}

#[test]
fn ipv6_eight_listeners() {
    queued_on_close(true, 8);
}
