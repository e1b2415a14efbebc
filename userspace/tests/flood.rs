//! Heavy and hostile UDP traffic against the flow table, for real, in a fresh network
//! namespace per test: floods of one-datagram flows from distinct source addresses (sent
//! through a raw socket), a million flows, a slot reused by a staged generation, and the
//! daemon's speed at that size.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portshard::{dataplane::Dataplane, report::FlowTableReport, table::Slot};
use portshard_harness::{
    daemon::{Answer, DaemonRun, UdpFlows, kill_and_wait, scrape, workers},
    flood::{Flood, backlog_drops, udp_drops},
};

mod support;

use support::{EXE, PORT, cli_at, sandbox};

/// How long a daemon, worker or flow may take to be ready on a loaded host (longer than
/// the other files': these tests start under their own floods).
const READY: Duration = Duration::from_secs(30);

fn target() -> SocketAddrV4 {
    SocketAddrV4::new([127, 0, 0, 1].into(), PORT)
}

/// `portshard reload dns` through the control socket `control`, asserted to succeed.
fn reload(control: &Path) {
    let out = cli_at(control, &["reload", "dns"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UDP service `dns` of `workers` portshard echo workers with `extra` config lines.
fn config(workers: usize, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"dns\"\nproto = \"udp\"\nlisten = \"{}\"\nworkers = {workers}\ncommand = [\"{EXE}\", \"echo\"]\nrestart_delay = \"100ms\"\nstop_timeout = \"2s\"\n{extra}\n",
        target()
    )
}

fn flow_table(daemon: &DaemonRun) -> FlowTableReport {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .find(|s| s.name == "dns")
        .and_then(|s| s.flow_table)
        .expect("dns has a flow table")
}

fn pids(daemon: &DaemonRun) -> BTreeMap<Slot, u32> {
    workers(&daemon.status().unwrap())
        .remove("dns")
        .unwrap_or_default()
}

/// One round on every live flow, answers awaited for `timeout`: (answered by the expected
/// worker, by another, unanswered).
fn round_within(
    flows: &mut UdpFlows,
    expected: &[Answer],
    timeout: Duration,
) -> (usize, usize, usize) {
    tally(&flows.round(timeout).unwrap(), expected)
}

/// (answered by the expected worker, by another, unanswered) of `answers`.
fn tally(answers: &[Option<Answer>], expected: &[Answer]) -> (usize, usize, usize) {
    let same = answers
        .iter()
        .zip(expected)
        .filter(|(a, e)| **a == Some(**e))
        .count();
    let lost = answers.iter().filter(|a| a.is_none()).count();
    (same, answers.len() - same - lost, lost)
}

/// One round on every flow, those unanswered asked again twice, as a worker's receive
/// buffer on a loaded host can overflow and drop a datagram, which is no steering fault.
fn round(flows: &mut UdpFlows, expected: &[Answer]) -> (usize, usize, usize) {
    tally(
        &flows
            .round_again_if_lost(Duration::from_secs(2), 2)
            .unwrap(),
        expected,
    )
}

#[test]
fn a_flood_of_one_datagram_flows_during_a_reload_moves_no_live_flow() {
    const LIVE: usize = 4096;
    const FLOOD: u32 = 500_000;
    let sandbox = sandbox();
    let config = config(
        4,
        "mode = \"handover\"\ndrain_idle = \"5s\"\ndrain_timeout = \"120s\"",
    );
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("dns", 4)], READY).unwrap();
    let old: BTreeSet<u32> = pids(&daemon).into_values().collect();
    let mut live = UdpFlows::new(SocketAddr::V4(target()), LIVE).unwrap();
    let base = live.settle(READY).unwrap();
    // The second datagram admits each live flow to the flow table.
    assert_eq!(round(&mut live, &base), (LIVE, 0, 0));
    let admitted = flow_table(&daemon);
    assert_eq!((admitted.flows, admitted.new), (LIVE as u64, LIVE as u64));
    let drops_before = udp_drops().unwrap();
    let backlog_before = backlog_drops().unwrap();

    // The live flows send a datagram every 100 ms each until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(Mutex::new(Vec::new()));
    let sender = {
        let (stop, rounds, base) = (Arc::clone(&stop), Arc::clone(&rounds), base.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                // A short wait for answers, so the rounds go on every 100 ms through the
                // flood; an answer later than that counts as lost.
                let outcome = round_within(&mut live, &base, Duration::from_millis(300));
                rounds.lock().unwrap().push(outcome);
                thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
            }
            live
        })
    };
    // The flood, and a reload while it lasts.
    let flood = thread::spawn(|| {
        let started = Instant::now();
        let sent = Flood::new(target()).unwrap().send(0..FLOOD, 1).unwrap();
        (sent, started.elapsed())
    });
    reload(daemon.control());
    let (sent, flood_took) = flood.join().unwrap();
    let new: BTreeSet<u32> = pids(&daemon).into_values().collect();
    assert!(new.is_disjoint(&old));
    // A few more rounds after the flood, with generation 2 serving new work.
    let rounds_after_flood = rounds.lock().unwrap().len();
    while rounds.lock().unwrap().len() < rounds_after_flood + 5 {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let mut live = sender.join().unwrap();
    let table = flow_table(&daemon);
    let drops = udp_drops().unwrap() - drops_before;
    let backlog = backlog_drops().unwrap() - backlog_before;
    let rounds = rounds.lock().unwrap().clone();
    let lost: usize = rounds.iter().map(|r| r.2).sum();
    let moved: usize = rounds.iter().map(|r| r.1).sum();
    // Generation 1 still serves its live flows: none went to generation 2.
    let still_old = old
        .iter()
        .filter(|&&pid| Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(
        still_old.count(),
        old.len(),
        "generation 1 exited under load"
    );
    let last = round(&mut live, &base);
    eprintln!(
        "flood: {sent} one-datagram flows sent in {flood_took:?} during a reload; {} rounds of {LIVE} live flows, one every 100 ms each: {moved} datagrams answered by another worker, {lost} unanswered, {drops} dropped by full receive buffers, {backlog} by full input backlogs; then {last:?}; flow table {table:?}; rounds {rounds:?}",
        rounds.len()
    );
    assert_eq!(moved, 0, "a live flow left generation 1: {rounds:?}");
    assert_eq!(last.1, 0);
    assert!(
        lost as u64 <= drops,
        "{lost} live datagrams unanswered, but the sockets dropped only {drops}"
    );
    // One-datagram flows never enter the flow table: it holds the live flows alone.
    assert_eq!((table.flows, table.new), (LIVE as u64, LIVE as u64));
    assert_eq!(table.events.unkept, 0);
    assert!(table.events.pending >= u64::from(FLOOD) - drops);
}

#[test]
fn a_million_flows_take_a_million_entries_and_the_daemon_stays_quick() {
    const FLOWS: u32 = 1_000_000;
    let sandbox = sandbox();
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let config = config(4, "sticky = true\nflow_table = 2097152");
    let mut daemon = DaemonRun::start_with_args(
        Path::new(EXE),
        &config,
        sandbox.pins(),
        &["--metrics", &metrics.to_string()],
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 4)], READY).unwrap();

    // Two datagrams per flow: the second admits it.
    let started = Instant::now();
    let sent = Flood::new(target()).unwrap().send(0..FLOWS, 2).unwrap();
    let send_took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    let table = loop {
        let table = flow_table(&daemon);
        if table.flows >= u64::from(FLOWS) || Instant::now() > deadline {
            break table;
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Every flow has an entry of its own: as many distinct keys as flows, each one of the
    // flood's sources.
    let listed = Dataplane::open(sandbox.pins(), "dns")
        .unwrap()
        .flows()
        .unwrap();
    let keys: BTreeSet<SocketAddr> = listed.iter().map(|(key, _)| key.source()).collect();
    let expected: BTreeSet<SocketAddr> = (0..FLOWS)
        .map(|n| SocketAddr::V4(Flood::source(n)))
        .collect();
    eprintln!(
        "million: {sent} datagrams sent in {send_took:?}; flow table {table:?}; {} entries listed, {} distinct sources",
        listed.len(),
        keys.len()
    );
    assert_eq!(table.flows, u64::from(FLOWS));
    assert_eq!(table.events.unkept, 0);
    assert_eq!(listed.len(), FLOWS as usize);
    assert_eq!(
        keys, expected,
        "flows sharing an entry, or entries of no flow"
    );

    // `status --json` and a metrics scrape at this size.
    let timed = |what: &dyn Fn()| {
        let mut took: Vec<Duration> = (0..5)
            .map(|_| {
                let started = Instant::now();
                what();
                started.elapsed()
            })
            .collect();
        took.sort();
        took
    };
    let status_took = timed(&|| {
        let out = Command::new(EXE)
            .args(["status", "--json", "--bpffs"])
            .arg(sandbox.pins())
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"flows\":1000000"));
    });
    let scrape_took = timed(&|| {
        let text = scrape(metrics).unwrap();
        assert!(text.contains("portshard_flow_table_flows{service=\"dns\"} 1000000"));
    });

    // A worker killed during back-to-back scrapes: its entries go to their heirs.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut scrapes = 0;
            while !stop.load(Ordering::Relaxed) {
                scrape(metrics).unwrap();
                scrapes += 1;
            }
            scrapes
        })
    };
    let (&slot, &pid) = pids(&daemon).iter().next().unwrap();
    let dataplane = Dataplane::open(sandbox.pins(), "dns").unwrap();
    let fired = kill_and_wait(pid, Duration::from_secs(10)).unwrap();
    while dataplane.read_entries().iter().any(|e| e.owner == slot) {
        assert!(
            fired.elapsed() < Duration::from_secs(10),
            "slot {slot} never healed"
        );
    }
    let healed = fired.elapsed();

    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().unwrap();
    eprintln!(
        "million: status --json took {status_took:?}, a scrape {scrape_took:?} (5 each, sorted); slot {slot} healed {healed:?} after its worker's pidfd fired, during {scrapes} back-to-back scrapes"
    );
    // The speed targets (100 ms for a read, 5 ms for a heal) are `cargo xtask bench`'s
    // `status_ms_1m`, `scrape_ms_1m` and `heal_ms_1m`, measured alone; here, beside other
    // tests on a machine that may be loaded, the bounds only catch a daemon that walks the
    // flow table per read or heals behind the scrapes.
    assert!(status_took[2] < Duration::from_secs(1), "{status_took:?}");
    assert!(scrape_took[2] < Duration::from_secs(1), "{scrape_took:?}");
    assert!(healed < Duration::from_secs(1), "healed after {healed:?}");
}

#[test]
fn a_slot_reused_by_a_staged_generation_gets_none_of_the_old_flows() {
    const LIVE: usize = 1024;
    let sandbox = sandbox();
    let config = config(
        2,
        "mode = \"handover\"\ndrain_idle = \"1s\"\nready_delay = \"10s\"",
    );
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    let first: BTreeMap<Slot, u32> = pids(&daemon);
    let mut flows = UdpFlows::new(SocketAddr::V4(target()), LIVE).unwrap();
    let base = flows.settle(READY).unwrap();
    assert_eq!(round(&mut flows, &base), (LIVE, 0, 0));

    // Generation 2 takes new work; generation 1, quiet, drains and exits, freeing its slots.
    reload(daemon.control());
    for &pid in first.values() {
        portshard_harness::daemon::wait_exit(pid, Duration::from_secs(30)).unwrap();
    }
    let second: BTreeMap<Slot, u32> = pids(&daemon);

    // Generation 3 is staged in the freed slots for `ready_delay`: the old flows, still in
    // the flow table, must reach none of its workers.
    let staging = {
        let control = daemon.control().to_path_buf();
        thread::spawn(move || reload(&control))
    };
    let deadline = Instant::now() + READY;
    let staged: BTreeMap<Slot, u32> = loop {
        let status = daemon.status().unwrap();
        let dns = status.iter().find(|s| s.name == "dns").unwrap();
        let staged: BTreeMap<Slot, u32> = dns
            .slots
            .iter()
            .filter(|s| s.state == "starting" && s.pid != 0)
            .map(|s| (s.slot, s.pid))
            .collect();
        if staged.len() == 2 {
            break staged;
        }
        assert!(Instant::now() < deadline, "generation 3 never staged");
        thread::sleep(Duration::from_millis(10));
    };
    let reused: Vec<&Slot> = staged.keys().filter(|s| first.contains_key(s)).collect();
    assert!(
        !reused.is_empty(),
        "no slot reused: {first:?} then {staged:?}"
    );
    let answers = flows
        .round_again_if_lost(Duration::from_secs(2), 2)
        .unwrap();
    staging.join().unwrap();
    let to_staged = answers
        .iter()
        .filter(|a| a.is_some_and(|a| staged.values().any(|&p| p == a.pid)))
        .count();
    let to_second = answers
        .iter()
        .filter(|a| a.is_some_and(|a| second.values().any(|&p| p == a.pid)))
        .count();
    let table = flow_table(&daemon);
    eprintln!(
        "reused slots {reused:?}: {to_staged} of {LIVE} old flows reached the staged generation, {to_second} its predecessor; flow table {table:?}"
    );
    assert_eq!(to_staged, 0);
    assert_eq!(to_second, LIVE);
}

#[test]
fn idle_flows_are_swept_and_come_back_as_new_flows() {
    const FLOWS: usize = 256;
    let sandbox = sandbox();
    let config = config(2, "sticky = true\nflow_idle = \"2s\"");
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    let mut flows = UdpFlows::new(SocketAddr::V4(target()), FLOWS).unwrap();
    let base = flows.settle(READY).unwrap();
    assert_eq!(round(&mut flows, &base), (FLOWS, 0, 0));
    assert_eq!(flow_table(&daemon).flows, FLOWS as u64);

    // Quiet for longer than `flow_idle`: the sweeper removes every flow.
    let quiet = Instant::now();
    let swept = loop {
        let table = flow_table(&daemon);
        if table.flows == 0 {
            break table;
        }
        assert!(
            quiet.elapsed() < Duration::from_secs(60),
            "never swept: {table:?}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let took = quiet.elapsed();
    assert_eq!((swept.swept, swept.new), (FLOWS as u64, FLOWS as u64));
    assert!(
        took >= Duration::from_secs(2),
        "swept after {took:?}, before flow_idle"
    );

    // Back: each flow is new again, admitted on its second datagram, to the same worker
    // (nothing else changed in the table).
    assert_eq!(round(&mut flows, &base), (FLOWS, 0, 0));
    assert_eq!(round(&mut flows, &base), (FLOWS, 0, 0));
    let back = flow_table(&daemon);
    eprintln!(
        "idle: {FLOWS} flows swept {took:?} after they went quiet (flow_idle 2s); then {back:?}"
    );
    assert_eq!((back.flows, back.new), (FLOWS as u64, 2 * FLOWS as u64));
}
