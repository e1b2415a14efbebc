//! A service taken out of the config file and SIGHUP, for real: its socket-activated
//! Python workers drain and exit, its pins go, and the other service's flows stay where
//! they were, in a fresh network namespace.
mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use portshard_harness::daemon::{DaemonRun, UdpFlows, workers};
use support::{EXE, READY, WORKER, sandbox, target};

/// A UDP service of the Python worker on `port`.
fn service(name: &str, port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nproto = \"udp\"\nlisten = \"127.0.0.1:{port}\"\nworkers = 3\ncommand = [\"python3\", \"{WORKER}\"]\nstop_timeout = \"2s\"\ndrain_idle = \"1s\"\ndrain_timeout = \"20s\"\n\n"
    )
}

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_service_taken_out_of_the_config_drains_stops_and_loses_its_pins_alone() {
    let sandbox = sandbox();
    let (kept, removed) = (service("keep", 5300), service("gone", 5301));
    let mut daemon =
        DaemonRun::start(Path::new(EXE), &format!("{kept}{removed}"), sandbox.pins()).unwrap();
    daemon
        .wait_ready(&[("keep", 3), ("gone", 3)], READY)
        .unwrap();
    let mut flows = UdpFlows::new(target(), 64).unwrap();
    let before = flows.settle(READY).unwrap();
    let gone_target = SocketAddr::from(([127, 0, 0, 1], 5301));
    let mut gone_flows = UdpFlows::new(gone_target, 16).unwrap();
    gone_flows.settle(READY).unwrap();
    let gone: BTreeSet<u32> = workers(&daemon.status().unwrap())["gone"]
        .values()
        .copied()
        .collect();

    daemon.set_config(&kept).unwrap();
    let asked = Instant::now();
    daemon.hangup().unwrap();
    while !daemon
        .log_text()
        .contains("service taken out of the config")
    {
        assert!(
            asked.elapsed() < READY,
            "SIGHUP not applied: {}",
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Its workers keep serving their flows while they drain.
    let answers = gone_flows
        .round_again_if_lost(Duration::from_secs(2), 3)
        .unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a.is_some_and(|a| gone.contains(&a.pid))),
        "the draining workers answer every flow: {answers:?}"
    );
    while gone.iter().any(|&pid| running(pid)) {
        assert!(
            asked.elapsed() < READY * 2,
            "removed workers still run: {}",
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let pins = sandbox.pins().join("gone");
    while pins.exists() {
        assert!(
            asked.elapsed() < READY * 2,
            "pins of gone remain: {}",
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(10));
    }
    println!(
        "removed in {:?} (drain_idle 1s after the last datagram)",
        asked.elapsed()
    );
    let status = daemon.status().unwrap();
    assert_eq!(
        status.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["keep"]
    );
    let after = flows
        .round_again_if_lost(Duration::from_secs(2), 3)
        .unwrap();
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.is_none_or(|a| a.pid != b.pid))
        .count();
    assert_eq!(moved, 0, "the kept service's flows moved or were lost");
    let log = daemon.log_text();
    assert!(log.contains("service taken out of the config"), "{log}");
    assert!(!log.contains("worker died"), "{log}");
}
