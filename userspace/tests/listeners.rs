//! A service with several listeners (HTTP/3 beside HTTP/1.1 and 2, on IPv4 and IPv6): each
//! worker holds one socket per listener, from fd 3 on, each in the same slot of its
//! listener's reuseport group, so the one table steers all four alike and a worker's death
//! fails over the same way on each. Each test in a fresh network namespace, served by the
//! built-in `portshard echo`.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

mod support;

use portshard::table::Slot;
use portshard_harness::daemon::{Answer, DaemonRun, UdpFlows, kill_and_wait, read_greeting};
use socket2::{Domain, Socket, Type};
use support::{EXE, PORT, READY, cli, live_pid, pid_of, sandbox};

/// The four listeners, in config order, and the names their sockets get.
const LISTENERS: [(&str, &str); 4] = [
    ("tcp:127.0.0.1", "web-tcp4"),
    ("udp:127.0.0.1", "web-udp4"),
    ("tcp:[::1]", "web-tcp6"),
    ("udp:[::1]", "web-udp6"),
];

/// Flows (UDP) or source ports (TCP) per listener.
const FLOWS: usize = 256;

/// How long a killed worker's slot stays empty before its replacement starts: the time
/// its heirs have to answer.
const HEIR_WINDOW: Duration = Duration::from_secs(3);

fn v4() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

fn v6() -> SocketAddr {
    format!("[::1]:{PORT}").parse().unwrap()
}

/// Flows on each of the service's four listeners, in config order (tcp4, udp4, tcp6,
/// udp6); the TCP ones from source ports `tcp_port` (IPv4) and `tcp_port + 1000` (IPv6) on.
fn flows_on_every_listener(tcp_port: u16) -> [Flows; 4] {
    [
        Flows::Tcp(TcpFlows::new(v4(), tcp_port)),
        Flows::Udp(UdpFlows::new(v4(), FLOWS).unwrap()),
        Flows::Tcp(TcpFlows::new(v6(), tcp_port + 1000)),
        Flows::Udp(UdpFlows::new(v6(), FLOWS).unwrap()),
    ]
}

/// The service "web" on the four listeners, `workers` copies of `portshard echo`.
fn web_config(workers: usize) -> String {
    let listen: Vec<String> = LISTENERS
        .iter()
        .map(|(listener, _)| format!("\"{listener}:{PORT}\""))
        .collect();
    format!(
        "[[service]]\nname = \"web\"\nlisten = [{}]\nworkers = {workers}\ncommand = [\"{EXE}\", \"echo\"]\nrestart_delay = \"{}ms\"\nstop_timeout = \"2s\"\n",
        listen.join(", "),
        HEIR_WINDOW.as_millis()
    )
}

/// TCP "flows": connections from fixed source ports, so each one's 4-tuple, and so its
/// table entry, is the same on every round. Each is closed with a reset, leaving no
/// TIME_WAIT in the way of the next round's connection from the same port.
struct TcpFlows {
    target: SocketAddr,
    ports: Vec<u16>,
}

impl TcpFlows {
    fn new(target: SocketAddr, first_port: u16) -> Self {
        Self {
            target,
            ports: (first_port..).take(FLOWS).collect(),
        }
    }

    /// The worker that greets a connection from the flow's port; `None` if none does.
    fn answer(&self, flow: usize) -> Option<Answer> {
        let local = SocketAddr::new(
            if self.target.is_ipv6() {
                "::1".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            },
            self.ports[flow],
        );
        let socket = Socket::new(Domain::for_address(self.target), Type::STREAM, None).ok()?;
        socket.set_reuse_address(true).ok()?;
        socket.set_linger(Some(Duration::ZERO)).ok()?;
        socket.bind(&local.into()).ok()?;
        socket
            .connect_timeout(&self.target.into(), Duration::from_secs(2))
            .ok()?;
        let stream = TcpStream::from(socket);
        read_greeting(&stream, Duration::from_secs(2)).ok()
    }

    /// Every flow's answer.
    fn round(&self) -> Vec<Option<Answer>> {
        (0..self.ports.len())
            .map(|flow| self.answer(flow))
            .collect()
    }

    /// Every flow's answer, connecting again to those not answered until all are.
    fn settle(&self) -> Vec<Answer> {
        let deadline = Instant::now() + READY;
        let mut answers = self.round();
        loop {
            if answers.iter().all(Option::is_some) {
                return answers.into_iter().map(Option::unwrap).collect();
            }
            assert!(
                Instant::now() < deadline,
                "{}: flows never answered",
                self.target
            );
            for (flow, answer) in answers.iter_mut().enumerate() {
                if answer.is_none() {
                    *answer = self.answer(flow);
                }
            }
        }
    }
}

/// One listener's flows, either kind.
enum Flows {
    Udp(UdpFlows),
    Tcp(TcpFlows),
}

impl Flows {
    fn settle(&mut self) -> Vec<Answer> {
        match self {
            Self::Udp(flows) => flows.settle(READY).unwrap(),
            Self::Tcp(flows) => flows.settle(),
        }
    }

    fn round(&mut self) -> Vec<Option<Answer>> {
        match self {
            Self::Udp(flows) => flows
                .round_again_if_lost(Duration::from_secs(2), 2)
                .unwrap(),
            Self::Tcp(flows) => flows.round(),
        }
    }

    /// Waits until `slot`'s worker answers `flow`.
    fn wait_for(&mut self, flow: usize, slot: Slot) {
        let deadline = Instant::now() + READY;
        loop {
            let answer = match self {
                Self::Udp(flows) => flows
                    .round_of(&[flow], Duration::from_millis(20))
                    .unwrap()
                    .remove(&flow)
                    .flatten(),
                Self::Tcp(flows) => flows.answer(flow),
            };
            if answer.is_some_and(|a| a.slot == slot) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot} never answered flow {flow}"
            );
        }
    }
}

#[test]
fn each_worker_holds_a_socket_per_listener_in_its_slot_and_fails_over_alike_on_all_four() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(Path::new(EXE), &web_config(4), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("web", 4)], READY).unwrap();

    // Status: `proto` and `listen` are the first listener's; `listeners` names all four.
    let status = daemon.status().unwrap();
    let web = status.iter().find(|s| s.name == "web").unwrap();
    let expected: Vec<String> = LISTENERS
        .iter()
        .map(|(listener, _)| format!("{listener}:{PORT}"))
        .collect();
    assert_eq!(web.listeners, expected);
    assert_eq!((web.proto, web.listen.as_str()), ("tcp", "127.0.0.1:5300"));
    let cli = Command::new(EXE)
        .args(["status", "--bpffs"])
        .arg(sandbox.pins())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains(&expected.join(" ")), "{text}");

    // Socket activation: fds 3 to 6 are sockets, named in LISTEN_FDNAMES in order.
    let names: Vec<&str> = LISTENERS.iter().map(|(_, name)| *name).collect();
    for slot in 0..4 {
        let pid = pid_of(&daemon, "web", slot);
        for fd in 3..7 {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert!(
                target.to_string_lossy().starts_with("socket:["),
                "worker {pid} fd {fd}: {target:?}"
            );
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        let vars: Vec<&str> = environ.split('\0').collect();
        assert!(vars.contains(&"LISTEN_FDS=4"), "{vars:?}");
        let fdnames = format!("LISTEN_FDNAMES={}", names.join(":"));
        assert!(vars.contains(&fdnames.as_str()), "{vars:?}");
        assert!(vars.contains(&format!("PORTSHARD_SLOT={slot}").as_str()));
    }

    // Traffic on every listener reaches every worker.
    let mut listeners: Vec<(&str, Flows)> = ["tcp4", "udp4", "tcp6", "udp6"]
        .into_iter()
        .zip(flows_on_every_listener(20_000))
        .collect();
    let before: Vec<Vec<Answer>> = listeners
        .iter_mut()
        .map(|(_, flows)| flows.settle())
        .collect();
    let pids: BTreeMap<Slot, u32> = (0..4).map(|s| (s, pid_of(&daemon, "web", s))).collect();
    for ((name, _), answers) in listeners.iter().zip(&before) {
        let mut per_slot = BTreeMap::new();
        for answer in answers {
            assert_eq!(
                pids.get(&answer.slot),
                Some(&answer.pid),
                "{name}: {answer:?}"
            );
            *per_slot.entry(answer.slot).or_insert(0) += 1;
        }
        assert_eq!(per_slot.len(), 4, "{name}: {per_slot:?}");
    }

    // A worker dies: on each listener its flows go to heirs, nobody else's move.
    let victim: Slot = 2;
    let victim_pid = pids[&victim];
    let killed = kill_and_wait(victim_pid, READY).unwrap();
    for ((name, flows), before) in listeners.iter_mut().zip(&before) {
        let after = flows.round();
        let mut orphans = 0;
        for (flow, answer) in after.iter().enumerate() {
            if before[flow].slot == victim {
                orphans += 1;
                // An heir, or, on a host slow enough that the restart came first, the
                // replacement; never the dead worker, never unanswered.
                let answer = answer.unwrap_or_else(|| panic!("{name}: orphan {flow} lost"));
                assert_ne!(
                    answer.pid, victim_pid,
                    "{name}: flow {flow} on the dead worker"
                );
            } else {
                assert_eq!(
                    *answer,
                    Some(before[flow]),
                    "{name}: healthy flow {flow} moved"
                );
            }
        }
        assert!(orphans > 0, "{name}: no flow on the victim");
    }
    let heirs_in = killed.elapsed();

    // Its replacement gets them back, on all four.
    let replacement = loop {
        if let Some(pid) = live_pid(&daemon, "web", victim)
            && pid != victim_pid
        {
            break pid;
        }
        assert!(killed.elapsed() < READY, "no replacement worker");
        thread::sleep(Duration::from_millis(1));
    };
    for ((_, flows), before) in listeners.iter_mut().zip(&before) {
        let orphan = before.iter().position(|a| a.slot == victim).unwrap();
        flows.wait_for(orphan, victim);
    }
    for ((name, flows), before) in listeners.iter_mut().zip(&before) {
        let after = flows.round();
        for (flow, answer) in after.iter().enumerate() {
            let expected = if before[flow].slot == victim {
                Answer {
                    slot: victim,
                    pid: replacement,
                }
            } else {
                before[flow]
            };
            assert_eq!(
                *answer,
                Some(expected),
                "{name}: flow {flow} after the restart"
            );
        }
    }
    eprintln!(
        "4 listeners x {FLOWS} flows: the heirs answered every orphan within {heirs_in:?} of the SIGKILL, no survivor moved; replacement pid {replacement} took them back"
    );
}

#[test]
fn two_listeners_of_one_transport_and_family_are_refused_before_anything_starts() {
    let sandbox = sandbox();
    let config = web_config(1).replace("tcp:[::1]", "tcp:127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portshard.toml");
    std::fs::write(&path, config).unwrap();
    let pins = sandbox.pins().join("not-made");
    let out = Command::new(EXE)
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--bpffs")
        .arg(&pins)
        .arg("--control")
        .arg(dir.path().join("c.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "listeners \"tcp:127.0.0.1:{PORT}\" and \"tcp:127.0.0.2:{PORT}\" are both tcp4"
        )),
        "{stderr}"
    );
    assert!(!pins.exists(), "a pin directory was made: {stderr}");
}

#[test]
fn a_daemon_killed_and_restarted_adopts_every_listener_and_moves_no_flow() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(Path::new(EXE), &web_config(3), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("web", 3)], READY).unwrap();
    let mut listeners = flows_on_every_listener(22_000);
    let before: Vec<Vec<Answer>> = listeners.iter_mut().map(Flows::settle).collect();
    let pids: BTreeMap<Slot, u32> = (0..3).map(|s| (s, pid_of(&daemon, "web", s))).collect();

    // The daemon dies; a worker dies while it is down: the kernel fails its flows over on
    // every listener with nobody to help.
    daemon.kill9().unwrap();
    let victim: Slot = 1;
    kill_and_wait(pids[&victim], READY).unwrap();
    for (flows, before) in listeners.iter_mut().zip(&before) {
        for (flow, answer) in flows.round().iter().enumerate() {
            let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost"));
            if before[flow].slot == victim {
                assert_ne!(answer.slot, victim, "flow {flow}");
            } else {
                assert_eq!(answer, before[flow], "healthy flow {flow} moved");
            }
        }
    }

    // The restarted daemon adopts the pins and the workers, restarts the dead one, and
    // every flow is where it was, the dead worker's on its replacement.
    daemon.spawn().unwrap();
    daemon.wait_ready(&[("web", 3)], READY).unwrap();
    let status = daemon.status().unwrap();
    let web = status.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.listeners.len(), 4, "{:?}", web.listeners);
    assert_eq!(web.pin_layout, portshard_common::PIN_LAYOUT);
    assert!(web.foreign.is_empty(), "{:?}", web.foreign);
    let replacement = pid_of(&daemon, "web", victim);
    for (flows, before) in listeners.iter_mut().zip(&before) {
        let orphan = before.iter().position(|a| a.slot == victim).unwrap();
        flows.wait_for(orphan, victim);
        for (flow, answer) in flows.round().iter().enumerate() {
            let expected = if before[flow].slot == victim {
                Answer {
                    slot: victim,
                    pid: replacement,
                }
            } else {
                before[flow]
            };
            assert_eq!(*answer, Some(expected), "flow {flow} after the adoption");
        }
    }
    let log = daemon.log_text();
    assert!(!log.contains("foreign socket"), "{log}");
}

#[test]
fn a_balance_reload_moves_each_flow_once_to_the_same_successor_on_every_listener() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(Path::new(EXE), &web_config(3), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("web", 3)], READY).unwrap();
    let mut listeners: Vec<(&str, Flows)> = ["tcp4", "udp4", "tcp6", "udp6"]
        .into_iter()
        .zip(flows_on_every_listener(24_000))
        .collect();
    let before: Vec<Vec<Answer>> = listeners
        .iter_mut()
        .map(|(_, flows)| flows.settle())
        .collect();
    let old: Vec<u32> = (0..3).map(|s| pid_of(&daemon, "web", s)).collect();

    let reload = Command::new(EXE)
        .args(["reload", "web", "--control"])
        .arg(daemon.control())
        .output()
        .unwrap();
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    // One table for all four: each old slot's flows go to one new slot, the same one on
    // every listener, each served by a worker of the new generation.
    let new: BTreeMap<Slot, u32> = portshard_harness::daemon::workers(&daemon.status().unwrap())
        .remove("web")
        .unwrap();
    let mut successor: BTreeMap<Slot, Slot> = BTreeMap::new();
    for ((name, flows), before) in listeners.iter_mut().zip(&before) {
        for (flow, answer) in flows.round().iter().enumerate() {
            let answer = answer.unwrap_or_else(|| panic!("{name}: flow {flow} lost"));
            assert_eq!(
                new.get(&answer.slot),
                Some(&answer.pid),
                "{name}: {answer:?}"
            );
            assert!(
                !old.contains(&answer.pid),
                "{name}: flow {flow} on the old generation"
            );
            let next = *successor.entry(before[flow].slot).or_insert(answer.slot);
            assert_eq!(
                next, answer.slot,
                "{name}: flow {flow} of slot {}",
                before[flow].slot
            );
        }
    }
    assert_eq!(successor.len(), 3, "{successor:?}");
    eprintln!("reload: old slot -> new slot {successor:?} on all four listeners");
}

/// Copies `from` to `to` the way a package upgrade does: beside it, then renamed over it.
fn install(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    let copied = Command::new("cp").arg(from).arg(&staged).status().unwrap();
    assert!(
        copied.success(),
        "cp {} {}",
        from.display(),
        staged.display()
    );
    std::fs::rename(&staged, to).unwrap();
}

#[test]
fn an_upgrade_puts_the_new_program_on_every_listeners_group_and_moves_no_flow() {
    let second = std::env::var_os("PORTSHARD_UPGRADE_TEST_BINARY")
        .expect("run through `cargo xtask test`, which builds the second portshard");
    let sandbox = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("portshard");
    install(Path::new(EXE), &installed);
    let mut daemon = DaemonRun::start(&installed, &web_config(3), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("web", 3)], READY).unwrap();
    let mut listeners = flows_on_every_listener(26_000);
    let before: Vec<Vec<Answer>> = listeners.iter_mut().map(Flows::settle).collect();
    let status = daemon.status().unwrap();
    let tag = status[0].program_tag.clone();
    let workers = portshard_harness::daemon::workers(&status);

    // The second build's program differs: adoption attaches it to each listener's group
    // through a worker's sockets, then pins it.
    install(Path::new(&second), &installed);
    let out = cli(&daemon, &["upgrade"]);
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    let status = daemon.status().unwrap();
    assert_ne!(status[0].program_tag, tag, "the program was not replaced");
    assert_eq!(status[0].listeners.len(), 4);
    assert_eq!(portshard_harness::daemon::workers(&status), workers);
    for (flows, before) in listeners.iter_mut().zip(&before) {
        for (flow, answer) in flows.round().iter().enumerate() {
            assert_eq!(*answer, Some(before[flow]), "flow {flow} after the upgrade");
        }
    }
    assert!(
        daemon
            .log_text()
            .contains("put this build's program in place of the pinned one"),
        "{}",
        daemon.log_text()
    );
}
