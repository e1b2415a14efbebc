//! Zero-downtime upgrades for real: `portshard reload` and SIGHUP start a new generation of
//! socket-activated Python workers under load, in a fresh network namespace per test, while
//! clients check who answers every flow and connection, that nothing is reset or lost, and
//! that the old generation drains and exits.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portshard::{report::ServiceStatus, socket::Proto, table::Slot};
use portshard_common::TABLE_SIZE;
use portshard_harness::{
    daemon::{Answer, DaemonRun, UdpFlows, echo, tcp_greeting, workers},
    flows::{Flows, Listener, bind_listeners, moved},
    scenario::Sandbox,
};

const EXE: &str = env!("CARGO_BIN_EXE_portshard");
const WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/echo.py");
const PORT: u16 = 5300;
const READY: Duration = Duration::from_secs(20);
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// The UDP handover test's `drain_idle`: longer than a loaded host may leave the live flows
/// silent between two rounds (a round asking lost flows again, a slow settle of new flows),
/// after which the old generation would rightly idle out.
const QUIET_DRAIN_IDLE: Duration = Duration::from_secs(5);

fn target() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// One service of the Python worker with `extra` config lines.
fn config(name: &str, proto: &str, workers: usize, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nproto = \"{proto}\"\nlisten = \"127.0.0.1:{PORT}\"\nworkers = {workers}\ncommand = [\"python3\", \"{WORKER}\"]\nrestart_delay = \"100ms\"\nstop_timeout = \"2s\"\ndrain_idle = \"{}ms\"\n{extra}\n",
        DRAIN_IDLE.as_millis()
    )
}

fn sandbox() -> Sandbox {
    Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox (needs root and BPF): {e}"))
}

/// The daemon serving one service (see [`config`]), once its workers are up.
fn start(sandbox: &Sandbox, name: &str, proto: &str, workers: usize, extra: &str) -> DaemonRun {
    let config = config(name, proto, workers, extra);
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[(name, workers)], READY).unwrap();
    daemon
}

fn reload(daemon: &DaemonRun, service: &str) -> Output {
    Command::new(EXE)
        .args(["reload", service, "--control"])
        .arg(daemon.control())
        .output()
        .unwrap()
}

fn live_pids(daemon: &DaemonRun, service: &str) -> BTreeMap<Slot, u32> {
    workers(&daemon.status().unwrap())
        .remove(service)
        .unwrap_or_default()
}

fn status_of(daemon: &DaemonRun, service: &str) -> ServiceStatus {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .find(|s| s.name == service)
        .unwrap()
}

/// Each generation of `service` and its state, oldest first.
fn generations(daemon: &DaemonRun, service: &str) -> Vec<(u32, &'static str)> {
    status_of(daemon, service)
        .generations
        .iter()
        .map(|g| (g.generation, g.state))
        .collect()
}

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until none of `pids` runs; returns how long that took.
fn wait_exited(pids: &BTreeSet<u32>, timeout: Duration) -> Duration {
    let start = Instant::now();
    while pids.iter().any(|&pid| running(pid)) {
        assert!(
            start.elapsed() < timeout,
            "old workers {:?} still run after {timeout:?}",
            pids.iter().filter(|&&p| running(p)).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// What the TCP clients saw: (when the connection was opened, who answered), and failures.
#[derive(Default)]
struct TcpLoad {
    answers: Vec<(Instant, u32)>,
    failures: Vec<String>,
}

#[test]
fn tcp_handover_under_load_resets_nothing_and_sends_new_connections_to_the_new_generation() {
    let sandbox = sandbox();
    let daemon = start(&sandbox, "web", "tcp", 4, "mode = \"handover\"");
    let old: BTreeSet<u32> = live_pids(&daemon, "web").into_values().collect();
    // At least 16, and until every old worker holds one: a worker holding none would
    // rightly idle out before the checks below.
    let mut held: Vec<(TcpStream, Answer)> = Vec::new();
    while held.len() < 16
        || !old
            .iter()
            .all(|pid| held.iter().any(|(_, a)| a.pid == *pid))
    {
        assert!(
            held.len() < 1024,
            "some old worker was never reached: {old:?}"
        );
        held.push(tcp_greeting(target(), Duration::from_secs(2)).unwrap());
    }

    let load = Arc::new(Mutex::new(TcpLoad::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (load, stop) = (load.clone(), stop.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let opened = Instant::now();
                    let outcome = tcp_greeting(target(), Duration::from_secs(2)).and_then(
                        |(mut stream, answer)| {
                            echo(
                                &mut stream,
                                &format!("c{client} {n}\n"),
                                Duration::from_secs(2),
                            )
                            .map(|()| answer)
                        },
                    );
                    let mut load = load.lock().unwrap();
                    match outcome {
                        Ok(answer) => load.answers.push((opened, answer.pid)),
                        Err(e) => load.failures.push(format!("connection {n}: {e}")),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let reloaded = reload(&daemon, "web");
    let switched = Instant::now();
    let stdout = String::from_utf8_lossy(&reloaded.stdout).into_owned();
    assert!(
        reloaded.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());

    let new: BTreeSet<u32> = live_pids(&daemon, "web").into_values().collect();
    assert_eq!(new.len(), 4);
    assert!(new.is_disjoint(&old), "no new generation: {new:?}");
    assert_eq!(generations(&daemon, "web"), [(1, "draining"), (2, "ready")]);
    // Held connections keep working on their old workers, which wait for them.
    for (i, (stream, answer)) in held.iter_mut().enumerate() {
        assert!(old.contains(&answer.pid));
        echo(stream, &format!("held {i}\n"), Duration::from_secs(2)).unwrap();
    }
    assert!(
        old.iter().all(|&pid| running(pid)),
        "an old worker left early"
    );
    drop(held);
    let drained = wait_exited(&old, DRAIN_IDLE * 5 + Duration::from_secs(5));

    let load = load.lock().unwrap();
    let after: Vec<u32> = load
        .answers
        .iter()
        .filter(|(opened, _)| *opened > switched)
        .map(|&(_, pid)| pid)
        .collect();
    let stray: Vec<u32> = after
        .iter()
        .copied()
        .filter(|pid| !new.contains(pid))
        .collect();
    eprintln!(
        "tcp handover: {} connections under load ({} opened after the switch), {} failed; reload took {:?}; old workers exited {drained:?} after their last held connection closed; reload said: {stdout}",
        load.answers.len() + load.failures.len(),
        after.len(),
        load.failures.len(),
        switched - asked
    );
    assert!(load.failures.is_empty(), "{:?}", load.failures);
    assert!(!after.is_empty());
    assert!(
        stray.is_empty(),
        "connections after the switch on old pids {stray:?}"
    );
    // The daemon frees an exited worker's slot just after reaping it.
    let deadline = Instant::now() + READY;
    while !status_of(&daemon, "web")
        .slots
        .iter()
        .all(|s| s.generation == 2)
    {
        assert!(Instant::now() < deadline, "generation 1 slots never freed");
        thread::sleep(Duration::from_millis(10));
    }
}

/// One UDP round on `flows`, the unanswered asked again twice: (answers equal to
/// `expected`, other answers, still unanswered).
fn round_against(flows: &mut UdpFlows, expected: &[Answer]) -> (usize, usize, usize) {
    let answers = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    let same = answers
        .iter()
        .zip(expected)
        .filter(|(a, e)| **a == Some(**e))
        .count();
    let lost = answers.iter().filter(|a| a.is_none()).count();
    (same, answers.len() - same - lost, lost)
}

#[test]
fn udp_handover_keeps_live_flows_on_their_generation_and_sends_new_ones_to_the_new() {
    let sandbox = sandbox();
    let config = config("dns", "udp", 4, "mode = \"handover\"").replace(
        &format!("drain_idle = \"{}ms\"", DRAIN_IDLE.as_millis()),
        &format!("drain_idle = \"{}ms\"", QUIET_DRAIN_IDLE.as_millis()),
    );
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("dns", 4)], READY).unwrap();
    let old: BTreeSet<u32> = live_pids(&daemon, "dns").into_values().collect();
    let mut live = UdpFlows::new(target(), 4096).unwrap();
    let base = live.settle(READY).unwrap();

    // Reload while the live flows keep sending.
    let child = Command::new(EXE)
        .args(["reload", "dns", "--control"])
        .arg(daemon.control())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut rounds = vec![round_against(&mut live, &base)];
    let reloaded = child.wait_with_output().unwrap();
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    for _ in 0..3 {
        rounds.push(round_against(&mut live, &base));
    }
    let new: BTreeSet<u32> = live_pids(&daemon, "dns").into_values().collect();
    assert!(new.is_disjoint(&old));
    let mut fresh = UdpFlows::new(target(), 1024).unwrap();
    let fresh_answers = fresh.settle(READY).unwrap();
    let fresh_on_new = fresh_answers
        .iter()
        .filter(|a| new.contains(&a.pid))
        .count();
    // A flow is entered in the flow table on its second datagram, to where its first went.
    let fresh_second = round_against(&mut fresh, &fresh_answers);
    assert_eq!(fresh_second, (fresh.len(), 0, 0));
    rounds.push(round_against(&mut live, &base));
    let table = status_of(&daemon, "dns").flow_table.unwrap();
    // `portshard flows` lists each flow with the slot and generation that answered it.
    let listed = Command::new(EXE)
        .args(["flows", "dns", "--json", "--bpffs"])
        .arg(daemon.pins())
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let per_generation = |generation: u64| -> u64 {
        listed["by_slot"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["generation"] == generation)
            .map(|g| g["flows"].as_u64().unwrap())
            .sum()
    };

    // The live flows go quiet: the old generation idles out and exits.
    let quiet = Instant::now();
    let drained = wait_exited(&old, QUIET_DRAIN_IDLE * 5 + Duration::from_secs(5));
    let after_exit = live.round_again_if_lost(Duration::from_secs(2), 2).unwrap();
    let moved_to_new = after_exit
        .iter()
        .filter(|a| a.is_some_and(|a| new.contains(&a.pid)))
        .count();
    let owner_gone = status_of(&daemon, "dns").flow_table.unwrap().owner_gone;

    // Plain SO_REUSEPORT on the same kind of reload: new sockets join, then the old close.
    let (kernel_joined, kernel_closed) = plain_reuseport_reload();
    eprintln!(
        "udp handover: {} live flows, rounds (same worker, other worker, lost) {rounds:?}; {fresh_on_new}/{} new flows on generation 2; flow table {table:?}; old generation exited {:?} after the flows went quiet (drain_idle {QUIET_DRAIN_IDLE:?}); then {moved_to_new} live flows on generation 2, owner_gone {owner_gone}; plain SO_REUSEPORT: {kernel_joined} of 4096 live flows moved when the new sockets joined, {kernel_closed} when the old closed",
        live.len(),
        fresh.len(),
        drained.max(quiet.elapsed()),
    );
    for (same, other, lost) in &rounds {
        assert_eq!((*same, *other, *lost), (live.len(), 0, 0));
    }
    assert_eq!(
        fresh_on_new,
        fresh.len(),
        "new flows went to the old generation"
    );
    assert_eq!(moved_to_new, live.len());
    // Each flow entered the table once, on its second datagram; its later datagrams were
    // hits.
    assert_eq!(table.new, (live.len() + fresh.len()) as u64);
    assert!(table.hits >= (rounds.len() * live.len()) as u64);
    assert_eq!(owner_gone, live.len() as u64);
    assert_eq!(
        (per_generation(1), per_generation(2)),
        (live.len() as u64, fresh.len() as u64)
    );
}

/// Plain `SO_REUSEPORT`: 4 UDP sockets and 4096 flows; 4 new sockets join (a new
/// generation), then the 4 old ones close. Returns the flows moved by each step.
fn plain_reuseport_reload() -> (usize, usize) {
    let plain = SocketAddr::from(([127, 0, 0, 1], PORT + 1));
    let flows = Flows::new(Proto::Udp, plain, 4096);
    let mut listeners = bind_listeners(Proto::Udp, plain, 4).unwrap();
    let before = flows.round(&listeners).unwrap();
    for _ in 0..4 {
        listeners.push(Some(Listener::bind(Proto::Udp, plain).unwrap()));
    }
    let joined = flows.round(&listeners).unwrap();
    for old in &mut listeners[..4] {
        *old = None;
    }
    let closed = flows.round(&listeners).unwrap();
    (moved(&before, &joined), moved(&joined, &closed))
}

#[test]
fn sticky_balance_adding_a_worker_moves_no_live_flow() {
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, "dns", "udp", 4, "sticky = true");
    let mut live = UdpFlows::new(target(), 4096).unwrap();
    let base = live.settle(READY).unwrap();
    daemon
        .set_config(&config("dns", "udp", 5, "sticky = true"))
        .unwrap();
    daemon.hangup().unwrap();
    let pids = daemon.wait_ready(&[("dns", 5)], READY).unwrap();
    let newcomer = pids[0]
        .slots
        .iter()
        .find(|s| s.slot == 4)
        .expect("a fifth slot")
        .pid;
    let after = round_against(&mut live, &base);
    let mut fresh = UdpFlows::new(target(), 2048).unwrap();
    let on_newcomer = fresh
        .settle(READY)
        .unwrap()
        .iter()
        .filter(|a| a.pid == newcomer)
        .count();
    eprintln!(
        "sticky balance: a fifth worker joined 4; live flows (same, other, lost) {after:?}; {on_newcomer}/{} new flows on the newcomer (table share 0.2)",
        fresh.len()
    );
    assert_eq!(after, (live.len(), 0, 0));
    assert_eq!(
        generations(&daemon, "dns"),
        [(1, "ready")],
        "a worker count change took a new generation"
    );
    let share = on_newcomer as f64 / fresh.len() as f64;
    assert!((0.15..0.25).contains(&share), "newcomer share {share}");
}

#[test]
fn a_failing_generation_is_rolled_back_and_a_balance_reload_moves_each_flow_once() {
    let sandbox = sandbox();
    let good = config("dns", "udp", 3, "");
    let daemon = start(&sandbox, "dns", "udp", 3, "");
    let before = live_pids(&daemon, "dns");
    let mut live = UdpFlows::new(target(), 2048).unwrap();
    let base = live.settle(READY).unwrap();

    let failing = good.replace(
        &format!("command = [\"python3\", \"{WORKER}\"]"),
        // A shell exits at once, well inside the ready delay even on a loaded host.
        "command = [\"sh\", \"-c\", \"exit 3\"]",
    );
    daemon.set_config(&failing).unwrap();
    let refused = reload(&daemon, "dns");
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(
        refused.status.code(),
        Some(4),
        "a rollback exits 4: {stderr}"
    );
    assert!(
        stderr.contains("generation 2 rolled back") && stderr.contains("exit code 3"),
        "{stderr}"
    );
    assert_eq!(
        live_pids(&daemon, "dns"),
        before,
        "the old generation changed"
    );
    let status = status_of(&daemon, "dns");
    assert!(
        status
            .slots
            .iter()
            .all(|s| s.generation == 1 && s.state == "live")
    );
    assert_eq!(round_against(&mut live, &base), (live.len(), 0, 0));

    // Fixed: the reload goes through; in balance mode (no flow table) each old slot's
    // flows move, all of them to one new slot.
    daemon.set_config(&good).unwrap();
    let done = reload(&daemon, "dns");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let after = live.round_again_if_lost(Duration::from_secs(2), 2).unwrap();
    let mut successor: BTreeMap<Slot, BTreeSet<Slot>> = BTreeMap::new();
    for (flow, answer) in after.iter().enumerate() {
        let answer = answer.unwrap_or_else(|| panic!("flow {flow} lost in the reload"));
        successor
            .entry(base[flow].slot)
            .or_default()
            .insert(answer.slot);
    }
    eprintln!(
        "rollback: reload exited {:?} with {stderr}; balance reload: old slot -> new slots {successor:?}",
        refused.status.code()
    );
    let targets: BTreeSet<Slot> = successor.values().flatten().copied().collect();
    assert!(successor.values().all(|s| s.len() == 1), "{successor:?}");
    assert_eq!(targets.len(), before.len(), "{successor:?}");
    assert!(targets.is_disjoint(&before.keys().copied().collect()));
}

#[test]
fn a_reload_after_a_weight_change_moves_each_entry_once_and_evens_the_shares() {
    let sandbox = sandbox();
    let daemon = start(&sandbox, "dns", "udp", 3, "");
    let old = live_pids(&daemon, "dns");
    let heavy = *old.keys().next().unwrap();
    let request = portshard::control::Request::Weight {
        service: "dns".into(),
        slot: heavy,
        weight: 3,
    };
    daemon.request(&request).unwrap();
    let done = reload(&daemon, "dns");
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // The new slot taking the heavy slot's place also goes back to the configured weight:
    // one write, so each entry moves once (not once to it and again to evening out).
    assert!(
        stdout.contains(&format!("{TABLE_SIZE} table entries moved")),
        "{stdout}"
    );
    let status = status_of(&daemon, "dns");
    let shares: Vec<u32> = status
        .slots
        .iter()
        .filter(|s| s.generation == 2)
        .map(|s| s.entries)
        .collect();
    eprintln!("weighted reload: {stdout} new shares {shares:?}");
    assert_eq!(shares.len(), 3, "{:?}", status.slots);
    assert!(
        shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1,
        "{shares:?}"
    );
}

#[test]
fn a_restarted_daemon_goes_on_draining_the_old_generation() {
    let sandbox = sandbox();
    let mut daemon = start(&sandbox, "web", "tcp", 2, "mode = \"handover\"");
    let old: BTreeSet<u32> = live_pids(&daemon, "web").into_values().collect();
    let (mut held, answer) = tcp_greeting(target(), Duration::from_secs(2)).unwrap();
    assert!(reload(&daemon, "web").status.success());
    let new = live_pids(&daemon, "web");
    daemon.kill9().unwrap();
    daemon.spawn().unwrap();
    daemon.wait_ready(&[("web", 2)], READY).unwrap();
    assert_eq!(live_pids(&daemon, "web"), new, "the new generation changed");
    assert_eq!(generations(&daemon, "web"), [(1, "draining"), (2, "ready")]);
    // The old worker holding the connection is still there for it.
    echo(&mut held, "still here\n", Duration::from_secs(2)).unwrap();
    assert!(running(answer.pid));
    drop(held);
    let drained = wait_exited(&old, DRAIN_IDLE * 5 + Duration::from_secs(5));
    let (_, fresh) = tcp_greeting(target(), Duration::from_secs(2)).unwrap();
    assert!(new.values().any(|&pid| pid == fresh.pid));
    eprintln!(
        "restart mid-drain: old generation exited {drained:?} after its last connection closed"
    );
    assert!(
        daemon
            .log_text()
            .contains("adopted an old generation's worker")
    );
}

#[test]
fn a_generation_that_never_answers_its_readiness_probe_is_rolled_back() {
    let sandbox = sandbox();
    let probe = "probe = \"udp:ping\"\nprobe_interval = \"200ms\"\nprobe_timeout = \"100ms\"\nprobe_failures = 2";
    let daemon = start(&sandbox, "dns", "udp", 2, probe);
    let before = live_pids(&daemon, "dns");
    let mut live = UdpFlows::new(target(), 512).unwrap();
    let base = live.settle(READY).unwrap();
    // Alive, with its socket, but never reading it: only a probe can tell.
    let silent = config("dns", "udp", 2, probe).replace(
        &format!("command = [\"python3\", \"{WORKER}\"]"),
        "command = [\"python3\", \"-c\", \"import time; time.sleep(600)\"]",
    );
    daemon.set_config(&silent).unwrap();
    let refused = reload(&daemon, "dns");
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&refused.stdout).into_owned();
    eprintln!("silent generation: {stdout}{stderr}");
    assert_eq!(refused.status.code(), Some(4), "a rollback exits 4");
    assert!(
        stderr.contains("generation 2 rolled back") && stderr.contains("readiness probe"),
        "{stderr}"
    );
    assert_eq!(live_pids(&daemon, "dns"), before);
    assert_eq!(generations(&daemon, "dns"), [(1, "ready")]);
    assert_eq!(round_against(&mut live, &base), (live.len(), 0, 0));
}

#[test]
fn a_sighup_doubling_every_weight_moves_no_entry() {
    let sandbox = sandbox();
    let daemon = start(&sandbox, "dns", "udp", 4, "");
    let dataplane = portshard::dataplane::Dataplane::open(sandbox.pins(), "dns").unwrap();
    let before = dataplane.read_entries();
    daemon
        .set_config(&config("dns", "udp", 4, "weight = 2"))
        .unwrap();
    daemon.hangup().unwrap();
    let logged = "weight 2 on every slot: ";
    let deadline = Instant::now() + READY;
    let log = loop {
        let log = daemon.log_text();
        if log.contains(logged) {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "the weight change never applied:\n{log}"
        );
        thread::sleep(Duration::from_millis(10));
    };
    let line = log.lines().find(|l| l.contains(logged)).unwrap();
    let after = dataplane.read_entries();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let weights: Vec<u32> = status_of(&daemon, "dns")
        .slots
        .iter()
        .filter(|s| s.state == "live")
        .map(|s| s.weight)
        .collect();
    eprintln!("doubled weights: {moved} entries changed; {line}");
    assert_eq!(weights, [2, 2, 2, 2]);
    assert!(line.contains(": 0 entries moved"), "{line}");
    assert_eq!(moved, 0);
}
