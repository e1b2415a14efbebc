//! Health probes for real: the daemon probes socket-activated Python workers in a fresh
//! network namespace. A stopped worker is found hung and replaced while nothing else moves;
//! healthy workers are never killed, not when a client uses a probe's port, and not when
//! they are driven past saturation on a loaded host.
mod support;

use std::{
    collections::{BTreeMap, VecDeque},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portshard::{control::Request, report::SlotReport, table::Slot};
use portshard_harness::{
    daemon::{DaemonRun, UdpFlows, scrape, tcp_greeting, workers},
    netns::raise_fd_limit,
    scenario::Sandbox,
};
use support::{EXE, READY, WORKER, config, sandbox, signal, target, wait_replaced};

/// How far past its probe schedule the daemon may be on a loaded 2-core host and still be
/// right: far more than it takes there, far less than never.
const LOADED_SLACK: Duration = Duration::from_secs(5);

/// `config(services)` with a health probe on every service: `udp:<payload>` for UDP,
/// `tcp` for TCP, every `interval`, hung after `failures` unanswered in a row.
fn config_probed(services: &[(&str, &str, usize)], interval: Duration, failures: u32) -> String {
    services
        .iter()
        .map(|&(name, proto, workers)| {
            let probe = if proto == "udp" { "udp:are you there" } else { "tcp" };
            format!(
                "{}\nprobe = \"{probe}\"\nprobe_interval = \"{}ms\"\nprobe_timeout = \"{}ms\"\nprobe_failures = {failures}\n\n",
                config(&[(name, proto, workers)]).trim_end(),
                interval.as_millis(),
                interval.as_millis() / 2,
            )
        })
        .collect()
}

/// Each live slot's probe state of `service`, from `status`.
fn probe_states(daemon: &DaemonRun, service: &str) -> BTreeMap<Slot, (&'static str, u32)> {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .find(|s| s.name == service)
        .map(|s| {
            s.slots
                .iter()
                .filter(|slot| slot.state == "live")
                .map(|slot| (slot.slot, (slot.probe, slot.probe_failures)))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every live slot of `service` has `workers` probes passing.
fn wait_probes_passing(daemon: &DaemonRun, service: &str, workers: usize) {
    let deadline = Instant::now() + READY;
    loop {
        let states = probe_states(daemon, service);
        if states.len() == workers && states.values().all(|&(probe, _)| probe == "passing") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} probes never all passed: {states:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon serving `dns` (UDP) and `web` (TCP), 4 workers each, probed every `interval`
/// (3 failures in a row make a worker hung), once every probe has passed.
fn start_probed(sandbox: &Sandbox, interval: Duration) -> DaemonRun {
    let services = [("dns", "udp", 4), ("web", "tcp", 4)];
    let mut daemon = DaemonRun::start(
        Path::new(EXE),
        &config_probed(&services, interval, 3),
        sandbox.pins(),
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 4), ("web", 4)], READY).unwrap();
    wait_probes_passing(&daemon, "dns", 4);
    wait_probes_passing(&daemon, "web", 4);
    daemon
}

/// What `status` shows of `slot` of `service`.
fn slot_status(daemon: &DaemonRun, service: &str, slot: Slot) -> SlotReport {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .find(|s| s.name == service)
        .and_then(|s| s.slots.into_iter().find(|report| report.slot == slot))
        .unwrap_or_else(|| panic!("{service} slot {slot} is not in the status"))
}

#[test]
fn a_hung_worker_fails_its_probes_and_is_restarted_while_nothing_else_moves() {
    let sandbox = sandbox();
    let interval = Duration::from_millis(200);
    let daemon = start_probed(&sandbox, interval);
    // Taken once every probe passed: on a loaded machine a worker still starting up may
    // miss its first probes and be restarted before it ever passed one.
    let before = workers(&daemon.status().unwrap());
    let mut flows = UdpFlows::new(target(), 1024).unwrap();
    let base = flows.settle(READY).unwrap();
    let shown = Command::new(EXE)
        .args(["status", "--bpffs"])
        .arg(sandbox.pins())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(shown.matches("  passing").count(), 8, "{shown}");

    for (service, slot) in [("dns", 1), ("web", 2)] {
        let hung = before[service][&slot];
        let stopped = Instant::now();
        signal(hung, libc::SIGSTOP);
        let replacement = wait_replaced(&daemon, service, slot, hung);
        let took = stopped.elapsed();
        assert!(
            !Path::new(&format!("/proc/{hung}")).exists(),
            "the hung worker {hung} was not killed"
        );
        // Not before its third counted miss could have come; and within the probe schedule
        // (3 intervals and a timeout) plus a slack generous enough for a loaded host.
        assert!(
            took >= interval * 2 && took < interval * 3 + interval / 2 + LOADED_SLACK,
            "{service} slot {slot} replaced after {took:?}"
        );
        eprintln!(
            "{service} slot {slot}: hung worker {hung} replaced by {replacement} {took:?} after SIGSTOP"
        );
    }
    let log = daemon.log_text();
    assert!(
        log.contains("worker is hung (alive, but answered none of its last 3 probes)"),
        "{log}"
    );
    wait_probes_passing(&daemon, "dns", 4);
    wait_probes_passing(&daemon, "web", 4);
    // The replacement got its flows back; nothing else moved.
    let now = workers(&daemon.status().unwrap());
    let after = flows
        .round_again_if_lost(Duration::from_secs(3), 2)
        .unwrap();
    for (flow, answer) in after.iter().enumerate() {
        let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost"));
        assert_eq!(answer.slot, base[flow].slot, "flow {flow} moved");
        assert_eq!(
            answer.pid, now["dns"][&answer.slot],
            "flow {flow}: a stale worker"
        );
    }
    let (_, greeting) = tcp_greeting(target(), Duration::from_secs(2)).unwrap();
    assert_eq!(greeting.pid, now["web"][&greeting.slot]);
    for (service, slots) in &now {
        for (slot, pid) in slots {
            let unchanged = before[service][slot] == *pid;
            let restarted = (service, *slot) == (&"dns".to_owned(), 1)
                || (service, *slot) == (&"web".to_owned(), 2);
            assert!(unchanged != restarted, "{service} slot {slot}: {pid}");
        }
    }
}

#[test]
fn a_client_on_a_probe_port_from_another_address_follows_the_table() {
    let sandbox = sandbox();
    let interval = Duration::from_millis(250);
    let daemon = start_probed(&sandbox, interval);
    let before = every_pid(&daemon);
    for (service, proto) in [("dns", "udp"), ("web", "tcp")] {
        // Drain slot 0: no new flow of the table's goes to it, only its probes.
        let request = Request::Drain {
            service: service.into(),
            slot: 0,
        };
        daemon.request(&request).unwrap();
        let source: SocketAddr = slot_status(&daemon, service, 0)
            .probe_source
            .as_deref()
            .unwrap_or_else(|| panic!("{service} slot 0 shows no probe source"))
            .parse()
            .unwrap();
        assert_eq!(source.ip(), target().ip(), "{service}: {source}");
        // The probe's port, from another loopback address.
        let client = SocketAddr::from(([127, 0, 0, 2], source.port()));
        let answer = if proto == "udp" {
            let socket = std::net::UdpSocket::bind(client).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            socket.send_to(b"who", target()).unwrap();
            let mut buffer = [0u8; 256];
            let (n, _) = socket.recv_from(&mut buffer).unwrap();
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        } else {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&client.into()).unwrap();
            socket.connect(&target().into()).unwrap();
            let stream: TcpStream = socket.into();
            let greeting = portshard_harness::daemon::read_greeting(&stream, READY).unwrap();
            format!("{} {}", greeting.slot, greeting.pid)
        };
        let slot: Slot = answer.split(' ').next().unwrap().parse().unwrap();
        eprintln!("{service}: a client at {client} (probe source {source}) reached slot {slot}");
        assert_ne!(
            slot, 0,
            "{service}: a client on the probe's port reached the drained slot"
        );
        // The daemon's own probes still reach the drained slot.
        thread::sleep(interval * 4);
        let probed = slot_status(&daemon, service, 0);
        assert_eq!(
            (probed.state, probed.probe, probed.probe_failures),
            ("draining", "passing", 0)
        );
    }
    assert_eq!(every_pid(&daemon), before, "a healthy worker was restarted");
}

/// The worker of every slot of every service, live or draining.
fn every_pid(daemon: &DaemonRun) -> BTreeMap<(String, Slot), u32> {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .flat_map(|service| {
            let name = service.name;
            service
                .slots
                .into_iter()
                .map(move |slot| ((name.clone(), slot.slot), slot.pid))
        })
        .collect()
}

/// A socket-activated TCP server that spends 20 ms on each connection, one at a time.
const SLOW: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/slow.py");
/// How long the workers are kept past saturation.
const SATURATED_FOR: Duration = Duration::from_secs(60);
/// The accept-queue length in the test's namespace (`net.core.somaxconn` caps the daemon's
/// backlog), so the queues fill within a second of the load.
const BACKLOG: u32 = 64;
/// Connections offered per second: five times what 8 slow workers accept (8 x 50/s).
const OFFERED: u32 = 2000;
/// Client sockets kept open at once; the oldest is reset to make room.
const HELD: usize = 10_000;

/// Writes `value` to the sysctl at `path` (under `/proc/sys`) of this thread's namespace.
fn sysctl(path: &str, value: &str) {
    std::fs::write(format!("/proc/sys/{path}"), value)
        .unwrap_or_else(|e| panic!("setting {path} to {value}: {e}"));
}

/// The namespace's count of connections dropped because an accept queue was full.
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .expect("TcpExt ListenOverflows in /proc/net/netstat")
}

/// An open-loop client: offers `per_second` new connections to `target` whatever happens
/// to the earlier ones, until stopped; returns how many it offered.
fn offer(target: SocketAddr, per_second: u32, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut held = VecDeque::with_capacity(HELD);
        let started = Instant::now();
        let mut offered = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = started.elapsed().as_micros() as u64 * u64::from(per_second) / 1_000_000;
            while offered < due {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket.set_nonblocking(true).unwrap();
                match socket.connect(&target.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => panic!("offering connection {offered}: {e}"),
                }
                held.push_back(socket);
                offered += 1;
            }
            while held.len() > HELD {
                let oldest = held.pop_front().unwrap();
                // A reset frees the port at once and takes the connection out of the queue.
                let _ = oldest.set_linger(Some(Duration::ZERO));
            }
            // The pace of an open-loop load, not a wait for anything.
            thread::sleep(Duration::from_millis(1));
        }
        offered
    })
}

/// The probes' outcomes of every slot added up, by outcome, from the metrics text.
fn probe_outcomes(metrics: &str) -> BTreeMap<String, u64> {
    let mut outcomes = BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels) = line.strip_prefix("portshard_probes_total{") else {
            continue;
        };
        let (labels, count) = labels.rsplit_once("} ").unwrap();
        let outcome = labels
            .split("outcome=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches('"');
        *outcomes.entry(outcome.to_owned()).or_default() += count.parse::<u64>().unwrap();
    }
    outcomes
}

#[test]
fn workers_driven_past_saturation_are_never_killed_and_a_stopped_one_still_is() {
    let sandbox = sandbox();
    sysctl("net/core/somaxconn", &BACKLOG.to_string());
    sysctl("net/ipv4/ip_local_port_range", "1024 65000");
    raise_fd_limit().unwrap();
    let interval = Duration::from_millis(250);
    let config = config_probed(&[("web", "tcp", 8)], interval, 3).replace(WORKER, SLOW);
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9300));
    let mut daemon = DaemonRun::start_with_args(
        Path::new(EXE),
        &config,
        sandbox.pins(),
        &["--metrics", &metrics.to_string()],
    )
    .unwrap();
    daemon.wait_ready(&[("web", 8)], READY).unwrap();
    wait_probes_passing(&daemon, "web", 8);
    let before = workers(&daemon.status().unwrap());

    let overflows = listen_overflows();
    let stop = Arc::new(AtomicBool::new(false));
    let load = offer(target(), OFFERED, Arc::clone(&stop));
    let deadline = Instant::now() + READY;
    while listen_overflows() == overflows {
        assert!(
            Instant::now() < deadline,
            "the load never filled an accept queue"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let saturated = Instant::now();
    while saturated.elapsed() < SATURATED_FOR {
        assert_eq!(
            workers(&daemon.status().unwrap()),
            before,
            "a saturated worker was killed after {:?} past saturation",
            saturated.elapsed()
        );
        thread::sleep(Duration::from_millis(500));
    }
    let dropped = listen_overflows() - overflows;
    let log = daemon.log_text();
    assert!(!log.contains("worker is hung"), "{log}");
    let outcomes = probe_outcomes(&scrape(metrics).unwrap());
    let excused: u64 = [
        "prober_late",
        "worker_busy",
        "worker_starved",
        "worker_gone",
        "probe_error",
    ]
    .iter()
    .map(|o| outcomes.get(*o).copied().unwrap_or(0))
    .sum();
    assert!(excused > 0, "no probe went unanswered: {outcomes:?}");
    // Not one miss counted against a worker that was only saturated.
    assert_eq!(outcomes.get("unanswered"), Some(&0), "{outcomes:?}");

    // Still saturated, one worker stops: it is found hung all the same.
    let hung = before["web"][&3];
    let stopped = Instant::now();
    signal(hung, libc::SIGSTOP);
    let replacement = wait_replaced(&daemon, "web", 3, hung);
    let took = stopped.elapsed();
    stop.store(true, Ordering::Relaxed);
    let offered = load.join().unwrap();
    eprintln!(
        "past saturation for {SATURATED_FOR:?}: {offered} connections offered, {dropped} SYNs dropped on full queues, probes {outcomes:?}, 0 workers killed; stopped worker {hung} replaced by {replacement} {took:?} after SIGSTOP"
    );
    assert!(
        dropped > u64::from(OFFERED),
        "only {dropped} connections overflowed: not past saturation"
    );
    assert!(
        took >= interval * 2 && took < interval * 3 + interval / 2 + LOADED_SLACK,
        "stopped worker replaced after {took:?}"
    );
    let now = workers(&daemon.status().unwrap());
    for (slot, pid) in &now["web"] {
        assert_eq!(
            *slot == 3,
            *pid != before["web"][slot],
            "slot {slot}: {pid}"
        );
    }
}
