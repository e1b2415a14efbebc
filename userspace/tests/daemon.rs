//! `portshard serve` for real: the daemon runs socket-activated workers written in Python
//! (an unmodified socket-activated server), each test in a fresh network namespace with its
//! own pin root and control socket. Workers are killed, stopped and the daemon itself is
//! killed and restarted, while clients check who answers every flow and connection.
use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

mod support;

use portshard::{control::Request, table::Slot};
use portshard_harness::daemon::{
    Answer, DaemonRun, UdpFlows, echo, kill_with_queue, tcp_greeting, wait_exit, workers,
};
use support::{EXE, READY, WORKER, config, live_pid, pid_of, sandbox, signal, start, target};

/// Waits until `slot`'s worker answers `flow`: a restarted worker has started reading.
fn wait_serving(flows: &mut UdpFlows, flow: usize, slot: Slot) {
    flows
        .first_answer(flow, |a| a.slot == slot, Duration::from_millis(10), READY)
        .unwrap()
        .unwrap_or_else(|| panic!("slot {slot} never answered flow {flow}"));
}

/// The UDP failover test's restart delay: the time its heirs have to answer.
const HEIR_WINDOW: Duration = Duration::from_secs(2);

#[test]
fn udp_worker_killed_fails_over_to_its_heirs_and_its_replacement_gets_its_flows_back() {
    let sandbox = sandbox();
    // The restart waits long enough that the heirs answer the killed worker's flows, even
    // on a loaded host, before its replacement takes them back.
    let config = config(&[("dns", "udp", 8)]).replace(
        "restart_delay = \"100ms\"",
        &format!("restart_delay = \"{}ms\"", HEIR_WINDOW.as_millis()),
    );
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("dns", 8)], READY).unwrap();
    let mut flows = UdpFlows::new(target(), 4096).unwrap();
    let before = flows.settle(READY).unwrap();

    let victim: Slot = 3;
    let victim_pid = pid_of(&daemon, "dns", victim);
    let orphans: Vec<usize> = (0..flows.len())
        .filter(|&f| before[f].slot == victim)
        .collect();
    assert!(!orphans.is_empty());
    let killed = Instant::now();
    signal(victim_pid, libc::SIGKILL);
    let (answered, heir) = flows
        .first_answer(
            orphans[0],
            |a| a.slot != victim,
            Duration::from_millis(10),
            HEIR_WINDOW,
        )
        .unwrap()
        .expect("the dead worker's flow was never answered");
    let failover = answered - killed;

    let after_kill = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    let mut survivors_moved = 0;
    let mut survivors_lost = 0;
    for (flow, answer) in after_kill.iter().enumerate() {
        match (before[flow].slot == victim, answer) {
            // An heir, or, on a host slow enough that the restart came first, the
            // replacement with its entries back; never the killed worker.
            (true, Some(a)) => assert!(
                a.slot != victim || a.pid != victim_pid,
                "flow {flow} still on the dead worker {victim_pid}"
            ),
            (true, None) => panic!("orphaned flow {flow} not answered by an heir"),
            (false, Some(a)) => survivors_moved += usize::from(*a != before[flow]),
            (false, None) => survivors_lost += 1,
        }
    }

    let replaced = loop {
        if let Some(pid) = live_pid(&daemon, "dns", victim)
            && pid != victim_pid
        {
            break (Instant::now() - killed, pid);
        }
        assert!(killed.elapsed() < READY, "no replacement worker");
        thread::sleep(Duration::from_millis(1));
    };
    // The replacement gets its entries back as soon as it is spawned; measure once it reads.
    wait_serving(&mut flows, orphans[0], victim);
    let after_restart = flows
        .round_again_if_lost(Duration::from_secs(3), 2)
        .unwrap();
    let mut back = 0;
    for (flow, answer) in after_restart.iter().enumerate() {
        let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost after the restart"));
        if before[flow].slot == victim {
            assert_eq!(
                answer,
                Answer {
                    slot: victim,
                    pid: replaced.1
                },
                "flow {flow}"
            );
            back += 1;
        } else {
            assert_eq!(answer, before[flow], "healthy flow {flow} moved");
        }
    }
    eprintln!(
        "udp: {} flows, {} on the killed slot; first answer from heir slot {} {failover:?} after SIGKILL; survivors moved {survivors_moved}, lost {survivors_lost}; replacement pid {} in status after {:?}; {back} flows back on it",
        flows.len(),
        orphans.len(),
        heir.slot,
        replaced.1,
        replaced.0
    );
    assert_eq!(survivors_moved, 0);
    assert_eq!(survivors_lost, 0);
    // Generous bounds that hold on a loaded host: the bench measures how fast failover
    // is (`failover_us`), and the daemon-down test proves the kernel does it alone.
    assert!(
        failover < Duration::from_secs(1),
        "failover took {failover:?}"
    );
    assert!(
        replaced.0 < HEIR_WINDOW + Duration::from_secs(5),
        "replacement took {:?}",
        replaced.0
    );
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("pid={victim_pid}")) && log.contains("signal 9 (SIGKILL)"),
        "{log}"
    );
}

#[test]
fn tcp_worker_killed_with_a_full_accept_queue_resets_nothing() {
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, &[("web", "tcp", 8)]);
    daemon.wait_ready(&[("web", 8)], READY).unwrap();
    let victim: Slot = 5;
    let outcome = kill_with_queue(pid_of(&daemon, "web", victim), target(), 512).unwrap();
    let status = daemon.status().unwrap();
    let migrated: u64 = status[0].slots.iter().map(|s| s.counters.migrated).sum();
    eprintln!("tcp: {outcome:?}; migrated counter {migrated}");
    assert!(
        outcome.queued > 0,
        "no connection waited in the stopped worker's queue"
    );
    assert_eq!(outcome.reset, 0);
    assert!(!outcome.answered_by.contains_key(&victim));
    assert!(
        migrated >= outcome.queued as u64,
        "migrated {migrated} < queued {}",
        outcome.queued
    );
}

/// One burst of load: a UDP round and `connections` TCP connections.
struct Burst {
    lost: usize,
    moved: usize,
    failed_connections: usize,
}

fn burst(flows: &mut UdpFlows, base: &[Answer], connections: usize) -> Burst {
    let answers = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    let lost = answers.iter().filter(|a| a.is_none()).count();
    let moved = answers
        .iter()
        .zip(base)
        .filter(|(a, b)| a.is_some_and(|a| a != **b))
        .count();
    let failed_connections = (0..connections)
        .filter(|_| tcp_greeting(target(), Duration::from_secs(2)).is_err())
        .count();
    Burst {
        lost,
        moved,
        failed_connections,
    }
}

#[test]
fn daemon_killed_and_restarted_under_load_moves_and_loses_nothing() {
    let sandbox = sandbox();
    let services = [("dns", "udp", 8), ("web", "tcp", 8)];
    let mut daemon = start(&sandbox, &services);
    let before = workers(&daemon.wait_ready(&[("dns", 8), ("web", 8)], READY).unwrap());
    let mut flows = UdpFlows::new(target(), 1024).unwrap();
    let base = flows.settle(READY).unwrap();
    let mut held: Vec<TcpStream> = (0..16)
        .map(|_| tcp_greeting(target(), Duration::from_secs(2)).unwrap().0)
        .collect();

    let mut bursts = vec![burst(&mut flows, &base, 32)];
    daemon.kill9().unwrap();
    bursts.push(burst(&mut flows, &base, 32));
    bursts.push(burst(&mut flows, &base, 32));
    daemon.spawn().unwrap();
    bursts.push(burst(&mut flows, &base, 32));
    daemon.wait_control(READY).unwrap();
    bursts.push(burst(&mut flows, &base, 32));
    let after = workers(&daemon.status().unwrap());
    for (i, connection) in held.iter_mut().enumerate() {
        echo(connection, &format!("held {i}\n"), Duration::from_secs(2)).unwrap();
    }

    let json = Command::new(EXE)
        .args(["status", "--json", "--bpffs"])
        .arg(daemon.pins())
        .output()
        .unwrap();
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let from_cli: BTreeMap<String, BTreeMap<Slot, u32>> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let slots = s["slots"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|slot| slot["state"] == "live")
                .map(|slot| {
                    (
                        slot["slot"].as_u64().unwrap() as Slot,
                        slot["pid"].as_u64().unwrap() as u32,
                    )
                })
                .collect();
            (s["name"].as_str().unwrap().to_owned(), slots)
        })
        .collect();
    let total = |f: fn(&Burst) -> usize| bursts.iter().map(f).sum::<usize>();
    eprintln!(
        "daemon kill -9 and restart: {} bursts of {} UDP flows and 32 connections: lost {}, moved {}, failed connections {}; 16 held connections echo; workers before {before:?} after {after:?}",
        bursts.len(),
        flows.len(),
        total(|b| b.lost),
        total(|b| b.moved),
        total(|b| b.failed_connections)
    );
    assert_eq!(total(|b| b.lost), 0);
    assert_eq!(total(|b| b.moved), 0);
    assert_eq!(total(|b| b.failed_connections), 0);
    assert_eq!(after, before, "workers changed across the daemon restart");
    assert_eq!(from_cli, before, "status --json disagrees");
    assert!(daemon.log_text().contains("adopted running worker"));
}

#[test]
fn a_worker_dying_while_the_daemon_is_down_fails_over_and_is_restarted_on_adoption() {
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, &[("dns", "udp", 4)]);
    daemon.wait_ready(&[("dns", 4)], READY).unwrap();
    let mut flows = UdpFlows::new(target(), 1024).unwrap();
    let base = flows.settle(READY).unwrap();
    daemon.kill9().unwrap();
    let victim: Slot = 1;
    let victim_pid = pid_of(&daemon, "dns", victim);
    signal(victim_pid, libc::SIGKILL);
    // Its socket closes with it; only then do its flows go to their heirs.
    wait_exit(victim_pid, READY).unwrap();
    let down = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    for (flow, answer) in down.iter().enumerate() {
        let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost while the daemon was down"));
        if base[flow].slot == victim {
            assert_ne!(answer.slot, victim);
        } else {
            assert_eq!(
                answer, base[flow],
                "healthy flow {flow} moved while the daemon was down"
            );
        }
    }
    let failed_over: u64 = daemon.status().unwrap()[0]
        .slots
        .iter()
        .map(|s| s.counters.failed_over)
        .sum();
    assert!(
        failed_over > 0,
        "the kernel did not fail over through the heirs"
    );

    daemon.spawn().unwrap();
    daemon.wait_ready(&[("dns", 4)], READY).unwrap();
    let replacement = pid_of(&daemon, "dns", victim);
    assert_ne!(replacement, victim_pid);
    let orphan = (0..flows.len()).find(|&f| base[f].slot == victim).unwrap();
    wait_serving(&mut flows, orphan, victim);
    let after = flows
        .round_again_if_lost(Duration::from_secs(3), 2)
        .unwrap();
    for (flow, answer) in after.iter().enumerate() {
        let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost after adoption"));
        let expected = if base[flow].slot == victim {
            Answer {
                slot: victim,
                pid: replacement,
            }
        } else {
            base[flow]
        };
        assert_eq!(answer, expected, "flow {flow}");
    }
}

#[test]
fn drain_and_weight_go_through_the_daemon_and_move_only_that_slot() {
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, &[("dns", "udp", 4)]);
    daemon.wait_ready(&[("dns", 4)], READY).unwrap();
    let mut flows = UdpFlows::new(target(), 2048).unwrap();
    let base = flows.settle(READY).unwrap();
    let control = daemon.control().to_str().unwrap().to_owned();
    let cli = |args: &[&str]| {
        Command::new(EXE)
            .args(args)
            .args(["--control", &control])
            .output()
            .unwrap()
    };
    let drained = cli(&["drain", "dns", "2", "--json"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let outcome: serde_json::Value = serde_json::from_slice(&drained.stdout).unwrap();
    assert_eq!(
        (outcome["outcome"].as_str(), outcome["moved"].as_u64()),
        (Some("done"), Some(16384)),
        "{outcome}"
    );
    assert!(
        outcome["message"]
            .as_str()
            .unwrap()
            .contains("16384 entries moved")
    );
    let during = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    for (flow, answer) in during.iter().enumerate() {
        let answer = answer.unwrap();
        if base[flow].slot == 2 {
            assert_ne!(answer.slot, 2, "flow {flow} still goes to the drained slot");
        } else {
            assert_eq!(
                answer, base[flow],
                "flow {flow} of a slot not drained moved"
            );
        }
    }
    let status = daemon.status().unwrap();
    let slot2 = status[0].slots.iter().find(|s| s.slot == 2).unwrap();
    assert_eq!((slot2.state, slot2.entries), ("draining", 0));

    let back = cli(&["weight", "dns", "2", "1"]);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    let restored = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    let returned = restored
        .iter()
        .zip(&base)
        .filter(|(a, b)| a.unwrap() == **b)
        .count();
    assert!(
        returned > flows.len() * 99 / 100,
        "only {returned} flows back where they were"
    );

    for (args, expected) in [
        (&["drain", "nope", "1"][..], "no service \"nope\""),
        (&["drain", "dns", "9"][..], "slot 9 has no running worker"),
        (
            &["weight", "dns", "1", "0"][..],
            "weight 0 for slot 1 is out of range",
        ),
    ] {
        let refused = cli(args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "a refusal exits 2: {stderr}"
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.matches(expected).count(), 1, "said twice: {stderr}");
        let json = cli(&[args, &["--json"]].concat());
        let outcome: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(outcome["outcome"], "refused", "{outcome}");
    }
    // A malformed request gets an error reply and the daemon keeps serving.
    let reply = daemon
        .request(&Request::Drain {
            service: "dns".into(),
            slot: u16::MAX,
        })
        .unwrap();
    assert!(format!("{reply:?}").contains("Error"));
    assert!(daemon.request(&Request::Ping).is_ok());
}

#[test]
fn bad_config_second_daemon_and_absent_daemon_get_clear_errors() {
    let sandbox = sandbox();
    let dir = tempdir();
    let (stderr, bad, code) = serve_refused(sandbox.pins(), &config(&[("dns", "udp", 0)]), |_| {});
    assert!(
        stderr.contains(&format!(
            "{}:5:11: service \"dns\" field `workers`: 0 is out of range",
            bad.display()
        )),
        "{stderr}"
    );
    assert_eq!(code, Some(2), "an invalid config exits 2");
    assert!(
        std::fs::read_dir(sandbox.pins()).unwrap().next().is_none(),
        "something was started"
    );

    let absent = Command::new(EXE)
        .args(["drain", "dns", "1", "--control"])
        .arg(dir.path().join("c.sock"))
        .output()
        .unwrap();
    assert_eq!(absent.status.code(), Some(3), "no daemon exits 3");
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("the portshard daemon is not running")
    );

    let mut daemon = start(&sandbox, &[("dns", "udp", 2)]);
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    let second = Command::new(EXE)
        .args(["serve", "--bpffs"])
        .arg(sandbox.pins())
        .arg("--control")
        .arg(dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr)
            .contains("another portshard daemon already serves pin root"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success());
    assert!(
        std::fs::read_dir(sandbox.pins()).unwrap().next().is_none(),
        "pins left after SIGTERM"
    );
}

/// A directory of this test's own, removed when it goes (even if the test fails).
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("portshard-cli-")
        .tempdir()
        .unwrap()
}

/// Runs the CLI as an unprivileged user (`nobody`) against `daemon`'s control socket.
fn cli_as_nobody(daemon: &DaemonRun, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt as _;
    Command::new(EXE)
        .args(args)
        .arg("--control")
        .arg(daemon.control())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

/// Sends raw `bytes` on a new control connection and returns every reply line, up to the
/// daemon closing the connection or `lines` replies.
fn raw_control(daemon: &DaemonRun, bytes: &[u8], lines: usize) -> Vec<String> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(daemon.control()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    BufReader::new(stream)
        .lines()
        .take(lines)
        .map(|line| line.unwrap())
        .collect()
}

#[test]
fn the_control_socket_refuses_non_root_and_answers_garbage_with_errors() {
    use std::os::unix::fs::PermissionsExt as _;
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, &[("dns", "udp", 2)]);
    let before = workers(&daemon.wait_ready(&[("dns", 2)], READY).unwrap());
    let mode = std::fs::metadata(daemon.control()).unwrap().permissions();
    assert_eq!(mode.mode() & 0o777, 0o600, "control socket mode");

    // Mode 0600 keeps other users out at connect(2) already...
    let denied = cli_as_nobody(&daemon, &["drain", "dns", "1"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("permission denied on control socket"),
        "{stderr}"
    );
    // ...and should the mode be opened up, the daemon still checks the peer's credentials.
    std::fs::set_permissions(daemon.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = cli_as_nobody(&daemon, &["drain", "dns", "1"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the daemon refused: permission denied: uid 65534 is not root"),
        "{stderr}"
    );

    for (garbage, expected) in [
        (&b"\x00\xff\xfe not json\n"[..], "malformed request"),
        (b"{\"v\":1}\n", "malformed request"),
        (
            b"{\"v\":1,\"request\":{\"op\":\"reboot\"}}\n",
            "unknown variant",
        ),
        (
            b"{\"v\":9,\"request\":{\"op\":\"ping\"}}\n",
            "protocol version 9 is not supported",
        ),
        (&[b'x'; 10_000][..], "longer than 4096 bytes"),
    ] {
        let replies = raw_control(&daemon, garbage, 1);
        assert_eq!(replies.len(), 1, "no reply to {garbage:?}");
        let reply = portshard::control::decode_reply(replies[0].as_bytes()).unwrap();
        match reply {
            portshard::control::Reply::Error { message, .. } => {
                assert!(message.contains(expected), "{message}")
            }
            other => panic!("{other:?} for garbage {garbage:?}"),
        }
    }
    // Several requests on one connection, the bad one in the middle: each gets its reply.
    let replies = raw_control(
        &daemon,
        b"{\"v\":1,\"request\":{\"op\":\"ping\"}}\n]]]\n{\"v\":1,\"request\":{\"op\":\"ping\"}}\n",
        3,
    );
    let kinds: Vec<bool> = replies
        .iter()
        .map(|line| {
            matches!(
                portshard::control::decode_reply(line.as_bytes()).unwrap(),
                portshard::control::Reply::Done { .. }
            )
        })
        .collect();
    assert_eq!(kinds, [true, false, true]);
    assert_eq!(
        workers(&daemon.status().unwrap()),
        before,
        "nothing changed"
    );
    assert!(daemon.request(&Request::Ping).is_ok());
    assert!(
        daemon
            .log_text()
            .contains("control connection refused: not root")
    );
}

/// SIGKILLs the live workers of `slots` at once and waits until each has a replacement
/// and every flow is answered again; returns the new pids.
fn kill_and_wait_replaced(
    daemon: &DaemonRun,
    flows: &mut UdpFlows,
    slots: &[Slot],
) -> BTreeMap<Slot, u32> {
    let old: Vec<u32> = slots.iter().map(|&s| pid_of(daemon, "dns", s)).collect();
    old.iter().for_each(|&pid| signal(pid, libc::SIGKILL));
    let deadline = Instant::now() + READY;
    let replaced = loop {
        let now: BTreeMap<Slot, u32> = slots
            .iter()
            .filter_map(|&s| live_pid(daemon, "dns", s).map(|pid| (s, pid)))
            .filter(|(_, pid)| !old.contains(pid))
            .collect();
        if now.len() == slots.len() {
            break now;
        }
        assert!(Instant::now() < deadline, "not replaced: {now:?}");
        thread::sleep(Duration::from_millis(5));
    };
    // The killed workers answer nothing, so once every flow is answered, every
    // replacement that owns flows reads.
    let deadline = Instant::now() + READY;
    while flows
        .round(Duration::from_secs(1))
        .unwrap()
        .iter()
        .any(Option::is_none)
    {
        assert!(Instant::now() < deadline, "replacements never all answered");
    }
    replaced
}

fn selected(daemon: &DaemonRun) -> u64 {
    daemon.status().unwrap()[0]
        .slots
        .iter()
        .map(|s| s.counters.selected)
        .sum()
}

#[test]
fn workers_dying_together_get_their_own_flows_back_and_a_group_whose_workers_all_died_is_rebuilt() {
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, &[("dns", "udp", 4)]);
    let mut pids = workers(&daemon.wait_ready(&[("dns", 4)], READY).unwrap())["dns"].clone();
    let mut flows = UdpFlows::new(target(), 2048).unwrap();
    let base = flows.settle(READY).unwrap();

    // Two at once: each replacement gets exactly its own flows back. Then all four: the
    // group vanishes with its last socket and the daemon makes a new one, attaches the
    // program again and balances it (no flow has a live worker to stay with, so the
    // layout need not be the old one).
    for (dying, own_flows_back) in [(&[1, 2][..], true), (&[0, 1, 2, 3][..], false)] {
        pids.extend(kill_and_wait_replaced(&daemon, &mut flows, dying));
        let selected_before = selected(&daemon);
        let after = flows
            .round_again_if_lost(Duration::from_secs(3), 2)
            .unwrap();
        let steered = selected(&daemon) - selected_before;
        let mut moved = 0;
        for (flow, answer) in after.iter().enumerate() {
            let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost after {dying:?} died"));
            assert_eq!(
                answer.pid, pids[&answer.slot],
                "flow {flow}: a stale worker"
            );
            moved += usize::from(answer.slot != base[flow].slot);
        }
        let entries: Vec<u32> = daemon.status().unwrap()[0]
            .slots
            .iter()
            .filter(|s| s.state == "live")
            .map(|s| s.entries)
            .collect();
        eprintln!(
            "slots {dying:?} killed together: {} flows, {moved} not back on their own slot; {steered} steered by the program; entries per slot {entries:?}",
            flows.len()
        );
        if own_flows_back {
            assert_eq!(moved, 0, "flows not back on their own slot");
        }
        assert!(
            steered >= flows.len() as u64,
            "the program did not steer the group: {steered} selections"
        );
        assert_eq!(entries, [16384; 4]);
    }
}

/// `config(services)` with every service's workers run as `user` and `group`, served by
/// the built-in `portshard echo` (the Python on this machine's PATH may sit where only root
/// can reach it).
fn config_as(services: &[(&str, &str, usize)], user: &str, group: &str) -> String {
    config(services)
        .replace(
            &format!("[\"python3\", \"{WORKER}\"]"),
            &format!("[\"{EXE}\", \"echo\"]"),
        )
        .replace(
            "stop_timeout = \"2s\"\n",
            &format!("stop_timeout = \"2s\"\nuser = \"{user}\"\ngroup = \"{group}\"\n"),
        )
}

/// `field:` of `/proc/<pid>/status`, its values split on whitespace.
fn proc_status(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The fds process `pid` has open, in order.
fn open_fds(pid: u32) -> Vec<u32> {
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|fd| fd.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort_unstable();
    fds
}

/// The uid and gid of `user` in the user database.
fn account(user: &str) -> (u32, u32) {
    let name = std::ffi::CString::new(user).unwrap();
    // SAFETY: getpwnam on a valid C string; the result is read at once, on this thread.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!entry.is_null(), "no user {user} on this machine");
    // SAFETY: non-null result of getpwnam.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

#[test]
fn workers_run_as_their_user_with_fds_0_to_3_no_capabilities_and_their_own_process_group() {
    let sandbox = sandbox();
    let (uid, gid) = account("nobody");
    let services = [("dns", "udp", 2), ("web", "tcp", 2)];
    let mut daemon = DaemonRun::start(
        Path::new(EXE),
        &config_as(&services, "nobody", &gid.to_string()),
        sandbox.pins(),
    )
    .unwrap();
    let pids = workers(&daemon.wait_ready(&[("dns", 2), ("web", 2)], READY).unwrap());
    let mut checked = 0;
    for (service, slots) in &pids {
        for &pid in slots.values() {
            // A TCP worker may still hold a connection it accepted (the readiness check's)
            // on a loaded host; an fd it inherited by mistake would never close.
            let deadline = Instant::now() + READY;
            loop {
                let fds = open_fds(pid);
                if fds == [0, 1, 2, 3] {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{service} worker {pid} fds {fds:?}"
                );
                thread::sleep(Duration::from_millis(10));
            }
            let ids = |field| proc_status(pid, field);
            assert_eq!(
                ids("Uid"),
                vec![uid.to_string(); 4],
                "{service} worker {pid}"
            );
            assert_eq!(
                ids("Gid"),
                vec![gid.to_string(); 4],
                "{service} worker {pid}"
            );
            assert!(ids("Groups").iter().all(|g| *g == gid.to_string()));
            for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
                assert_eq!(
                    ids(caps),
                    ["0000000000000000"],
                    "{service} worker {pid} {caps}"
                );
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let pgrp = stat.rsplit_once(") ").unwrap().1.split(' ').nth(2).unwrap();
            assert_eq!(
                pgrp,
                pid.to_string(),
                "{service} worker {pid} process group"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
    // Unprivileged, they still serve their inherited sockets.
    let mut flows = UdpFlows::new(target(), 64).unwrap();
    let answers = flows.settle(READY).unwrap();
    assert!(
        answers
            .iter()
            .all(|a| pids["dns"].values().any(|&p| p == a.pid))
    );
    let (_, greeting) = tcp_greeting(target(), Duration::from_secs(2)).unwrap();
    assert!(pids["web"].values().any(|&p| p == greeting.pid));
    eprintln!("4 workers run as uid {uid} gid {gid}, fds 0-3, no capabilities, own process group");
}

#[test]
fn an_unknown_worker_user_stops_the_daemon_before_anything_starts() {
    let sandbox = sandbox();
    let unknown_user = config_as(&[("dns", "udp", 2)], "no-such-user-here", "nogroup");
    // A second service with a program that is nowhere: both are reported at once.
    let missing = config(&[("web", "tcp", 1)]).replace("\"python3\"", "\"no-such-program-here\"");
    let pins = sandbox.pins().join("not-made");
    let (stderr, _, code) = serve_refused(&pins, &format!("{unknown_user}\n{missing}"), |_| {});
    assert!(
        stderr.contains("user \"no-such-user-here\" does not exist on this machine")
            && stderr.contains("cannot run \"no-such-program-here\": not found on PATH"),
        "{stderr}"
    );
    assert_eq!(
        code,
        Some(2),
        "a config naming what is not there is invalid input"
    );
    assert!(!pins.exists(), "a pin directory was made: {stderr}");
}

/// Runs `portshard serve` with `config` on `pins` to its end, with `setup` applied to the
/// command, and checks that it refused to start; returns its stderr, the config's path and
/// its exit code.
fn serve_refused(
    pins: &Path,
    config: &str,
    setup: impl FnOnce(&mut Command),
) -> (String, std::path::PathBuf, Option<i32>) {
    let temp = tempdir();
    let dir = temp.path();
    let path = dir.join("portshard.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(EXE);
    command
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--bpffs")
        .arg(pins)
        .arg("--control")
        .arg(dir.join("c.sock"));
    setup(&mut command);
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the daemon started: {stderr}");
    (stderr, path, out.status.code())
}

/// Every directory and file under `dir`, with its mode bits.
fn modes(dir: &Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut found = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            found.extend(modes(&path));
        }
        found.push((path, meta.permissions().mode() & 0o777));
    }
    found
}

#[test]
fn pin_directories_are_private_and_foreign_or_linked_pin_roots_are_refused_untouched() {
    let sandbox = sandbox();
    // A nested pin root is created mode 0700 all the way down, and so is each service's.
    let nested = sandbox.pins().join("a/b/root");
    let mut daemon =
        DaemonRun::start(Path::new(EXE), &config(&[("dns", "udp", 1)]), &nested).unwrap();
    daemon.wait_ready(&[("dns", 1)], READY).unwrap();
    let dirs: Vec<_> = modes(sandbox.pins())
        .into_iter()
        .filter(|(path, _)| path.is_dir())
        .collect();
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    assert!(dirs.iter().all(|(_, mode)| *mode == 0o700), "{dirs:?}");
    daemon.terminate().unwrap();
    drop(daemon);

    let dns = config(&[("dns", "udp", 1)]);
    // A pin root reached through a symbolic link is refused: the link could point anywhere.
    let real = sandbox.pins().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = sandbox.pins().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (stderr, _, _) = serve_refused(&link.join("root"), &dns, |_| {});
    assert!(
        stderr.contains(&format!(
            "pin path {} goes through a symbolic link at {}",
            link.join("root").display(),
            link.display()
        )),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(&real).unwrap().next().is_none(),
        "created through the link"
    );

    // A pin root holding another program's layout is refused and left as it was.
    for (foreign, what) in [
        ("Other_Program", "which is not a service directory"),
        ("dns/extra", "which is not one of portshard's pins"),
    ] {
        let root = sandbox.pins().join("foreign");
        std::fs::create_dir_all(root.join(foreign)).unwrap();
        let before = modes(&root);
        let (stderr, _, _) = serve_refused(&root, &dns, |_| {});
        assert!(
            stderr.contains(&format!(
                "pin root {} is not a portshard pin root",
                root.display()
            )) && stderr.contains(what)
                && stderr.contains("portshard does not overwrite it"),
            "{stderr}"
        );
        assert_eq!(modes(&root), before, "the foreign pin root was changed");
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`, `CAP_PERFMON` and `CAP_BPF` (`linux/capability.h`):
/// any of them lets a process load some eBPF.
const BPF_CAPABILITIES: [libc::c_int; 4] = [12, 21, 38, 39];

#[test]
fn without_bpf_the_daemon_says_why_and_what_to_do_and_starts_no_worker() {
    use std::os::unix::process::CommandExt as _;
    let sandbox = sandbox();
    let marker = std::env::temp_dir().join(format!("portshard-no-bpf-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // Every worker would leave the marker behind.
    let config = config(&[("dns", "udp", 2), ("web", "tcp", 2)]).replace(
        &format!("[\"python3\", \"{WORKER}\"]"),
        &format!("[\"touch\", \"{}\"]", marker.display()),
    );
    // Root, but without the capabilities BPF needs: dropped from the bounding set, so the
    // daemon's exec does not grant them.
    let (stderr, _, _) = serve_refused(sandbox.pins(), &config, |command| {
        // SAFETY: only prctl between fork and exec.
        unsafe {
            command.pre_exec(|| {
                for cap in BPF_CAPABILITIES {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
    });
    assert!(
        stderr.contains("loading the eBPF object for the pins in")
            && stderr.contains(
                "the kernel refused BPF to this process: run `portshard serve` as root with CAP_BPF"
            ),
        "{stderr}"
    );
    assert!(!marker.exists(), "a worker was started");
    assert!(
        std::fs::read_dir(sandbox.pins()).unwrap().next().is_none(),
        "pins left behind"
    );
}

#[test]
fn a_clean_stop_removes_the_directories_it_made() {
    let sandbox = sandbox();
    let temp = tempdir();
    let pins = sandbox.pins().join("made-by-the-daemon");
    let control = temp.path().join("run").join("control.sock");
    let path = temp.path().join("portshard.toml");
    std::fs::write(&path, config(&[("dns", "udp", 2)])).unwrap();
    let mut daemon = Command::new(EXE)
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--bpffs")
        .arg(&pins)
        .arg("--control")
        .arg(&control)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Serving once it answers on its control socket.
    let deadline = Instant::now() + READY;
    while portshard_harness::daemon::control_request(&control, &Request::Ping).is_err() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(pins.is_dir() && control.exists());
    signal(daemon.id(), libc::SIGTERM);
    assert!(daemon.wait().unwrap().success());
    assert!(!pins.exists(), "{} left after a clean stop", pins.display());
    assert!(
        !control.parent().unwrap().exists(),
        "{} left after a clean stop",
        control.parent().unwrap().display()
    );
}
